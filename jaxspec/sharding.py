"""Device meshes and one table of logical-axis → mesh-axis rules for parameters, the KV cache and decode state.

A mesh has a ``data`` axis (batch rows) and a ``model`` axis (tensor parallelism: attention by heads, the MLP by
its intermediate dimension, embeddings and logits by the vocabulary). An axis whose size the mesh axis does not
divide is replicated instead; so KV heads are sharded only when there are at least as many (a multiple) as model
shards, and replicated otherwise. Decoding is plain ``jax.jit`` (GSPMD): parameters and state are placed with
these shardings and ``MeshDecoder`` pins the decode loop's state to them, so XLA partitions draft and verify.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxspec.config import Config
from jaxspec.decode import Decoder, State
from jaxspec.model import AXES, KVCache, Params, hidden, param_shapes, params_from_flat
from jaxspec.validate import parse_mesh

Array = jax.Array
AXIS_NAMES = ("data", "model")

# Logical axis → mesh axis (None: replicated). Parameters and cache name their logical axes in ``model.AXES``.
RULES: dict[str, str | None] = {
    "layers": None,
    "batch": "data",
    "seq": None,
    "embed": None,
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",  # replicated when n_kv_heads is not a multiple of the model axis (see ``logical_spec``)
    "head_dim": None,
    "mlp": "model",
}


def make_mesh(spec: str | Sequence[int] = "1x1", devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes).

    ``jax.make_mesh`` orders devices by topology so the model axis stays within a host / ICI neighbourhood.
    """
    data, model = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices; {len(devices)} available")
    auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD propagation, not sharding-in-types
    return jax.make_mesh((data, model), AXIS_NAMES, axis_types=auto, devices=devices)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: dict[str, str | None] = RULES) -> PartitionSpec:
    """The partition spec of an array with logical ``axes``: each axis goes to its mesh axis by ``rules`` when
    that mesh axis divides its size and is not used yet by an earlier axis; replicated otherwise."""
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        m = rules.get(name) if name is not None else None
        if m is not None and (m in used or m not in mesh.shape or size % mesh.shape[m]):
            m = None
        if m is not None and mesh.shape[m] == 1:
            m = None
        spec.append(m)
        if m is not None:
            used.add(m)
    return PartitionSpec(*spec)


def named(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_axes(name: str) -> tuple[str, ...]:
    """Logical axes of a flat parameter name (``embed``, ``layers.3.wq``, ...)."""
    return AXES[name.rsplit(".", 1)[-1]]


def param_sharding_fn(mesh: Mesh) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """``(name, shape) → sharding`` for ``checkpoint.load_checkpoint(..., shardings=...)``: each host reads only
    its shards, so no host ever holds the whole model."""
    return lambda name, shape: named(mesh, param_axes(name), shape)


def abstract_params(cfg: Config, mesh: Mesh, dtype: str | None = None) -> Params:
    """``Params`` of ``jax.ShapeDtypeStruct`` with their shardings: for AOT lowering without weights."""
    fn, dt = param_sharding_fn(mesh), dtype or cfg.dtype
    shapes = param_shapes(cfg)
    return params_from_flat(cfg, {n: jax.ShapeDtypeStruct(s, dt, sharding=fn(n, s)) for n, s in shapes.items()})


def param_shardings(cfg: Config, mesh: Mesh) -> Params:
    """A ``Params`` tree of ``NamedSharding`` (``lm_head`` None when embeddings are tied)."""
    return jax.tree.map(lambda a: a.sharding, abstract_params(cfg, mesh))


def shard_params(params: Params, cfg: Config, mesh: Mesh) -> Params:
    """Place (or move) parameters onto ``mesh``. To load a checkpoint sharded, prefer
    ``load_checkpoint(path, shardings=param_sharding_fn(mesh))``, which never gathers a whole array on a host."""
    return place(params.replace(stacked=None), param_shardings(cfg, mesh))  # a stacked view would be a 2nd copy


def cache_shardings(cache: KVCache | Any, mesh: Mesh) -> KVCache:
    """Shardings of a (concrete or abstract) cache: batch over ``data``, KV heads over ``model`` when divisible."""
    kv = named(mesh, AXES["cache_kv"], cache.k.shape)
    return KVCache(k=kv, v=kv, lengths=named(mesh, AXES["cache_lengths"], cache.lengths.shape))


def state_shardings(state: State, mesh: Mesh) -> State:
    """Shardings that ``MeshDecoder`` pins the decode state to: the cache and the tokens fed to the model
    (``last``) are split over ``data`` by row, so every matmul is data- and tensor-parallel; the small per-row
    bookkeeping (``out``, counters, stats) stays replicated, so every process can read results
    (``np.asarray``) even when the data axis spans hosts."""
    rep = replicated(mesh)
    sh = jax.tree.map(lambda _: rep, state)
    return sh.replace(cache=cache_shardings(state.cache, mesh), last=named(mesh, ("batch",), state.last.shape))


@dataclass(frozen=True)
class MeshDecoder(Decoder):
    """Run ``inner`` (a ``Decoder`` or ``SpecDecoder``) on ``mesh``: its state is constrained to
    ``state_shardings`` at each step's entry and exit, and GSPMD partitions the draft and verify passes from
    the parameters' shardings (tensor parallel) and the state's (data parallel). Works with ``decode.generate``.

    Give it parameters placed by ``shard_params`` / ``param_sharding_fn`` and a batch that is a multiple of
    the data axis (``pad_rows``); other batches still run, with the batch replicated.
    """

    inner: Decoder | None = None
    mesh: Mesh | None = None

    @classmethod
    def wrap(cls, inner: Decoder, mesh: Mesh) -> MeshDecoder:
        return cls(inner.cfg, inner.sampling, inner.eos_ids, inner=inner, mesh=mesh)

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.inner.mode

    @property
    def extra(self) -> int:  # type: ignore[override]
        return self.inner.extra

    @property
    def needs_history(self) -> bool:  # type: ignore[override]
        return self.inner.needs_history

    def init_stats(self, batch: int, max_new: int, **init: float) -> Any:
        return self.inner.init_stats(batch, max_new, **init)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """The empty cache, created already sharded like decode's (each device allocates only its part)."""
        return _cache_fns(self.cfg, batch, max_len, self.mesh)[0]()

    def prefill_cache(self, params: Params, tokens: Array, cache: KVCache, lengths: Array, fresh: bool = False
                      ) -> tuple[Array, KVCache]:
        """Prefill with the prompt rows split over ``data`` and the cache kept in ``cache_shardings`` (attending over
        the whole cache, ``fresh`` or not)."""
        mesh = self.mesh
        tokens, lengths = place((tokens, lengths), (named(mesh, ("batch", "seq"), tokens.shape),
                                                    named(mesh, ("batch",), lengths.shape)))
        return _cache_fns(self.cfg, *cache.k.shape[1:3], mesh)[1](params, tokens, cache, lengths)

    def pin(self, state: State) -> State:
        return jax.lax.with_sharding_constraint(state, state_shardings(state, self.mesh))

    def step(self, params: Params, state: State) -> State:
        return self.pin(self.inner.step(params, self.pin(state)))

    def first(self, params: Params, state: State, h: Array) -> State:
        """``Decoder.first`` on and to a state placed with ``state_shardings`` (prefill builds it on one device)."""
        shardings = state_shardings(state, self.mesh)
        return place(Decoder.first(self, params, place(state, shardings), h), shardings)

    def run(self, params: Params, state: State, max_steps: Array) -> State:
        """``Decoder.run`` on a state first placed with ``state_shardings`` (a no-op once it is), so the loop
        compiles once: the state prefill returns and the state a run returns have the same shardings."""
        return Decoder.run(self, params, place(state, state_shardings(state, self.mesh)), max_steps)


@functools.cache
def _cache_fns(cfg: Config, batch: int, max_len: int, mesh: Mesh) -> tuple[Callable, Callable]:
    """Jitted (create, prefill) of a ``(batch, max_len)`` cache whose outputs have ``cache_shardings``."""
    sh = cache_shardings(jax.eval_shape(lambda: KVCache.create(cfg, batch, max_len)), mesh)

    def fill(params: Params, tokens: Array, cache: KVCache, lengths: Array) -> tuple[Array, KVCache]:
        h, cache = hidden(params, cfg, tokens, cache)
        return h, cache.replace(lengths=lengths)

    return (jax.jit(lambda: KVCache.create(cfg, batch, max_len), out_shardings=sh),
            jax.jit(fill, out_shardings=(None, sh), donate_argnums=2))


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``, also across processes: leaves that live on one process's devices
    (e.g. what ``decode.prefill`` builds with ``jnp``) must hold the same value on every process and are
    placed by a jitted identity, which accepts them where ``device_put`` does not."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    leaves, treedef = jax.tree.flatten(tree)
    shs = treedef.flatten_up_to(shardings)
    local = [i for i, x in enumerate(leaves) if getattr(x, "is_fully_addressable", True)]  # numpy too
    rest = [i for i in range(len(leaves)) if i not in set(local)]
    if local:  # as host values: a committed single-device argument would pin the jit to that device
        keys = {i: jax.random.key_impl(leaves[i]) for i in local
                if jax.dtypes.issubdtype(leaves[i].dtype, jax.dtypes.prng_key)}
        host = [np.asarray(jax.random.key_data(leaves[i]) if i in keys else leaves[i]) for i in local]

        def ident(*xs: Array) -> tuple[Array, ...]:
            return tuple(jax.random.wrap_key_data(x, impl=keys[i]) if i in keys else x
                         for i, x in zip(local, xs, strict=True))

        moved = jax.jit(ident, out_shardings=tuple(shs[i] for i in local))(*host)
        for i, x in zip(local, moved, strict=True):
            leaves[i] = x
    if rest:
        for i, x in zip(rest, jax.device_put([leaves[i] for i in rest], [shs[i] for i in rest]), strict=True):
            leaves[i] = x
    return treedef.unflatten(leaves)


def pad_rows(n: int, mesh: Mesh | None) -> int:
    """The smallest batch >= ``n`` that the mesh's data axis divides."""
    d = 1 if mesh is None else mesh.shape["data"]
    return -(-n // d) * d


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of (abstract or concrete) arrays with shardings (the largest shard)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total
