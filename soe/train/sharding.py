"""FSDP2 (torch ``fully_shard``, through Lightning's ModelParallelStrategy): what
``soe.train.build.build_stitcher_to_shard`` left on the meta device is filled in here, each rank keeping
only its own shard:

* connectors, attention k/v injection's new projections and LoRA adapters are drawn again, one
  module at a time, from the global RNG state the build recorded and in the order an eager build
  draws them (copied k/v weights read from the files), so their values equal a single-process
  build's bit for bit; each connector and projection is sharded before the next is drawn;
* the experts' weights are read from their files one block at a time, each rank reading only its
  rows; depth expansion's inserted blocks as the mean of their neighbours' rows.

Host memory per rank is then the shards plus one block's tensors in flight, instead of every expert
whole on every rank before sharding (``benchmarks/fsdp_host_memory.py`` measures both).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # what DCP uses to place shards

from soe.errors import CheckpointError
from soe.plugin.weights import FolderWeights


@dataclass
class ShardPlan:
    """What ``StitchModule.configure_model`` fills in after the Stitcher is sharded.

    ``rng_state``: the global CPU RNG where an eager build would draw the connectors (they, the new
    k/v projections and the LoRA adapters of ``lora`` were built on the meta device). ``weights``: ``{side:
    FolderWeights}`` of experts on the meta device. ``lora``: ``{side: LoraConfig}`` whose adapters
    wait on the meta device (``soe.train.build.apply_training_setup(..., plan=)``)."""

    rng_state: torch.Tensor | None = None
    weights: dict[str, FolderWeights] = field(default_factory=dict)
    lora: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.rng_state is not None or bool(self.weights)


def materialise(stitcher, plan: ShardPlan, mesh) -> None:
    """Everything ``plan`` left on the meta device, each rank keeping its shard (module docstring)."""
    if plan.rng_state is not None:
        from soe.lora.adapters import materialise_adapters

        outside = torch.get_rng_state()
        torch.set_rng_state(plan.rng_state)
        try:
            draw_connectors(stitcher, mesh)
            draw_kv(stitcher, plan.weights, mesh)  # attention k/v injection's new projections drew next
            for side, spec in plan.lora.items():  # LoRA drew after the connectors, a then b
                materialise_adapters(getattr(stitcher, side), spec, "cpu", f"experts.{side}.lora")
        finally:
            torch.set_rng_state(outside)  # what the rest of the run draws does not depend on the mesh
    shard_stitcher(stitcher, mesh)
    for side, weights in plan.weights.items():
        load_shards(getattr(stitcher, side), weights, side)
        load_inserted_shards(stitcher, side, weights)


def draw_connectors(stitcher, mesh=None) -> int:
    """Build each connector again on the host in ``Stitcher.connector_plan`` order (the draws of the
    eager constructor), move its values into the meta connector and, with a mesh, shard it before the
    next is built. Returns the number of connectors filled."""
    from soe.stitch.connector import Connector

    filled = 0
    plan = stitcher.connector_plan()
    last = {(d, key): n for n, (d, key, _, _) in enumerate(plan)}
    for n, (d, key, src_dim, dst_dim) in enumerate(plan):
        target = stitcher.connectors[d][key]
        dtype = next(target.parameters()).dtype
        real = Connector(src_dim, dst_dim, stitcher.spec, device="cpu", dtype=dtype)  # draws as the eager build did
        if last[(d, key)] != n or not any(p.is_meta for p in target.parameters()):
            continue  # replaced later in the eager build too
        target.load_state_dict(real.state_dict(), assign=True)
        del real
        if mesh is not None:
            shard_connector(target, mesh)  # only this rank's rows stay; the whole copy is freed
            give_back_freed_memory()
        filled += 1
    return filled


def draw_kv(stitcher, weights: dict, mesh=None) -> int:
    """Attention k/v injection's new projections (``fusion.kv``), built on the meta device: each is
    built again on the host in construction order (its ``nn.Linear`` draws), its copied weights
    (``init: copy``) and key norm read from the host expert's files as the eager build copies them
    from the loaded expert, then, with a mesh, sharded before the next. Returns the number filled."""
    from torch.distributed.fsdp import fully_shard

    fusion = stitcher.fusion
    if fusion is None:
        return 0
    filled = 0
    for per_block in fusion.kv.values():
        for mods in per_block.values():
            for proj in mods.values():
                if not any(p.is_meta for p in proj.parameters()):
                    continue
                side, k, attention, source, init = proj.origin
                values = {}
                for name in ("k", "v"):  # nn.Linear's own init: the draws of the eager constructor
                    m = getattr(proj, name)
                    real = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.weight.dtype)
                    values.update({f"{name}.{n}": t for n, t in real.state_dict().items()})
                with weights[side].reading() as files:
                    read = _block_reader(stitcher, side, k, files, weights[side])
                    if init == "copy":
                        for name, lin in (("k", "to_k"), ("v", "to_v")):
                            for n in list(values):
                                if n.startswith(name + "."):
                                    values[n] = read(f"{source}.{lin}.{n[2:]}").to(values[n].dtype)
                    if proj.norm_k is not None:
                        has_norm = isinstance(getattr(stitcher.run_order(side)[k].get_submodule(source), "norm_k", None), nn.Module)
                        owner = source if init == "copy" and has_norm else attention
                        for n, t in proj.norm_k.state_dict().items():
                            values[f"norm_k.{n}"] = read(f"{owner}.norm_k.{n}").to(t.dtype)
                proj.load_state_dict(values, assign=True)
                del values
                if mesh is not None:
                    fully_shard(proj, mesh=mesh)
                give_back_freed_memory()
                filled += 1
    return filled


def _block_reader(stitcher, side: str, k: int, files: FolderWeights, weights: FolderWeights):
    """``read(path)``: the whole tensor at ``path`` inside run-order block ``k`` of expert ``side``, read
    from the files in the expert's dtype: an inserted block's is the mean of its neighbours'."""
    expert = getattr(stitcher, side)
    names = {m: n for n, m in expert.model.named_modules()}
    stack = stitcher.fusion.stacks.get(side) if stitcher.fusion is not None else None
    if stack is not None and stack.is_inserted(k):
        i, j = stack.neighbours[f"{stack.order[k][1]:02d}"]
        prefixes = [names[expert.blocks[i]]] + ([names[expert.blocks[j]]] if j is not None else [])
    else:
        prefixes = [names[expert.blocks[stack.order[k][1] if stack is not None else k]]]
    block = stitcher.run_order(side)[k]

    def read(path: str) -> torch.Tensor:
        like = block.get_submodule(path.rsplit(".", 1)[0])
        t = getattr(like, path.rsplit(".", 1)[1])
        keys = [file_key(f"{pre}.{path}") for pre in prefixes]
        for key in keys:
            _check(files, key, t, weights, side)
        parts = [files.get(key).to(t.dtype) for key in keys]
        return _mean(parts) if t.is_floating_point() else parts[0]

    return read


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``; elsewhere nothing). glibc keeps
    what a freed tensor of a few MiB occupied, so without this every whole connector or block that
    was drawn or read and then dropped would stay in the resident set."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def shard_connector(connector, mesh) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(connector, mesh=mesh)
    register_fsdp_forward_method(connector, "map_steps")  # the lockstep engine's k/v injection calls it, not forward


def shard_stitcher(stitcher, mesh) -> None:
    """``fully_shard`` every expert block, then each expert, each connector not yet sharded and the whole Stitcher."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    for expert in (stitcher.a, stitcher.b):
        for block in expert.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(expert, mesh=mesh)
        for method in ("embed", "head"):  # the lockstep engine calls these, not forward: gather params there too
            register_fsdp_forward_method(expert, method)
    for inserted in (stitcher.fusion.inserted.values() if stitcher.fusion is not None else ()):
        for block in inserted.values():  # depth expansion's new blocks
            fully_shard(block, mesh=mesh)
    for group in stitcher.connectors.values():
        for connector in group.values():
            if not isinstance(connector, FSDPModule):
                shard_connector(connector, mesh)
    fully_shard(stitcher, mesh=mesh)


def file_key(name: str) -> str:
    """The name a parameter of an expert model has in the family's files (peft's LoRA wrapping adds
    ``base_layer``; soe never renames anything else)."""
    return name.replace(".base_layer.", ".")


def load_shards(expert, weights: FolderWeights, side: str = "expert") -> int:
    """Materialise the meta parameters of ``expert.model`` (sharded DTensors after ``shard_stitcher``)
    block by block: each tensor is read from ``weights``, cut to this rank's shard and dropped before
    the next block is read. Persistent buffers stored in the files are copied in too. Returns the
    number of tensors loaded; a tensor missing from the files or of another shape is a one-line
    :class:`CheckpointError`."""
    model = expert.model
    names = {m: n for n, m in model.named_modules()}
    blocks = list(expert.blocks)
    in_blocks = {m for b in blocks for m in b.modules()}
    rest = [m for m in model.modules() if m not in in_blocks]
    loaded = 0
    for group in [list(b.modules()) for b in blocks] + [rest]:
        with weights.reading() as files:  # the files are closed (unmapped) after each block
            for module in group:
                prefix = names[module] + "." if names[module] else ""
                for pname, p in list(module._parameters.items()):
                    if p is None or not p.is_meta:
                        continue
                    module._parameters[pname] = nn.Parameter(_shard_of(files, file_key(prefix + pname), p, weights, side),
                                                             requires_grad=p.requires_grad)
                    loaded += 1
                for bname, b in module._buffers.items():
                    key = file_key(prefix + bname)
                    if b is not None and bname not in module._non_persistent_buffers_set and key in files:
                        _check(files, key, b, weights, side)
                        b.copy_(files.get(key))
                        loaded += 1
        give_back_freed_memory()
    expert._execution_device = None  # inputs follow the weights again
    return loaded


def _check(files: FolderWeights, key: str, like: torch.Tensor, weights: FolderWeights, side: str) -> None:
    if key not in files:
        raise CheckpointError(f"experts.{side}.path: '{weights.folder}' has no tensor '{key}' that the model needs")
    if tuple(files.shapes[key]) != tuple(like.shape):
        raise CheckpointError(f"experts.{side}.path: '{weights.folder}': tensor '{key}' has shape "
                              f"{list(files.shapes[key])}, the model's is {list(like.shape)}")


def _shard_of(files: FolderWeights, key: str | list[str], p: torch.Tensor, weights: FolderWeights, side: str) -> torch.Tensor:
    """This rank's piece of parameter ``p``, read from the files: only its own rows are read. A list
    of two keys: their mean, in ``p``'s dtype (an inserted block between two original ones)."""
    keys = [key] if isinstance(key, str) else key
    for k in keys:
        _check(files, k, p, weights, side)
    if not isinstance(p, DTensor):
        return _mean([files.get(k).to(p.dtype) for k in keys])
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if 0 in shape:
        local = torch.empty(shape, dtype=p.dtype)
    else:
        index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        # a copy in the process's own memory: what safetensors hands back may still be backed by the file
        local = _mean([files.get(k, index).to(p.device_mesh.device_type, p.dtype, copy=True) for k in keys])
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _mean(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2  # soe.stitch.depth.interpolated_block's arithmetic


def load_inserted_shards(stitcher, side: str, weights: FolderWeights) -> int:
    """Depth expansion's inserted blocks of expert ``side`` (``fusion.inserted.<side>``), built as meta
    copies of the expert's blocks: each parameter and persistent floating buffer is the mean of the
    two neighbouring original blocks' tensors in the files (the left one's alone at the end of the
    stack), as ``soe.stitch.depth.interpolated_block`` computes it eagerly. Returns the tensors loaded."""
    fusion = stitcher.fusion
    if fusion is None or side not in fusion.inserted:
        return 0
    expert, stack = getattr(stitcher, side), fusion.stacks[side]
    names = {m: n for n, m in expert.model.named_modules()}
    loaded = 0
    for key, block in stack.inserted.items():
        i, j = stack.neighbours[key]
        prefixes = [names[expert.blocks[i]]] + ([names[expert.blocks[j]]] if j is not None else [])
        with weights.reading() as files:
            for mname, module in block.named_modules():
                sub = "." + mname if mname else ""
                for pname, p in list(module._parameters.items()):
                    if p is None or not p.is_meta:
                        continue
                    keys = [file_key(f"{pre}{sub}.{pname}") for pre in prefixes]
                    module._parameters[pname] = nn.Parameter(_shard_of(files, keys, p, weights, side), requires_grad=p.requires_grad)
                    loaded += 1
                for bname, b in module._buffers.items():
                    keys = [file_key(f"{pre}{sub}.{bname}") for pre in prefixes]
                    if b is not None and bname not in module._non_persistent_buffers_set and all(k in files for k in keys):
                        b.copy_(_mean([files.get(k).to(b.dtype) for k in keys]) if b.is_floating_point() else files.get(keys[0]))
                        loaded += 1
        give_back_freed_memory()
    return loaded
