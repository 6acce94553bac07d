"""The trainers on several processes: DDP, FSDP2 (``fully_shard``) or DeepSpeed ZeRO
(:mod:`fastrlhf.algos.deepspeed_engine`), launched by torchrun or accelerate.

    torchrun --nproc_per_node 2 $(which fastrlhf) train dpo --distributed ddp      # or fsdp2, deepspeed
    accelerate launch --num_processes 2 -m fastrlhf train dpo --distributed fsdp2

Implementation choices (and where they come from):

1. The process group comes from the launcher's environment (``RANK``, ``WORLD_SIZE``,
   ``MASTER_ADDR``... as torchrun and ``accelerate launch`` set them): ``gloo`` on CPU,
   ``nccl`` on CUDA, one GPU per process (``cuda:LOCAL_RANK``). ``distributed="auto"`` means
   DDP when ``WORLD_SIZE > 1``, else one process.
2. Every forward of a wrapped model (losses, logprobs, generation) runs *inside* the forward
   of one root module, :class:`RootForward`, whose forward is ``fn(model)``. So DDP's forward
   arms its gradient all-reduce, and FSDP2's root pre-forward all-gathers the root's own
   parameters (embeddings, final norm, lm_head, a reward head): the fused-linear loss then
   gets the plain, unsharded ``[V, H]`` lm_head weight, and its gradient flows into FSDP's
   reduce-scatter. Calling ``model.get_decoder()`` from outside would bypass both hooks.
3. Loading: under FSDP2 on GPUs a checkpoint is loaded into host memory (the CLI's
   ``load_device``; a model handed over on the host is treated the same) and ``fully_shard``
   (given a CUDA device mesh) moves the parameters to the GPU and shards them module by module,
   so no GPU ever holds the whole policy, reference or critic. (``deepspeed.initialize`` moves
   a whole model to the GPU before partitioning it unless it was built under
   ``deepspeed.zero.Init``, which the trainers do not do yet.)
   FSDP2: ``fully_shard`` on every decoder layer (the classes in the model's
   ``_no_split_modules``, as accelerate picks them), then on the root (torchtitan's recipe);
   ``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=float32)`` keeps fp32 master
   weights and fp32 gradient reduction; rank 0's parameters are broadcast first (FSDP2 and
   ZeRO-3, unlike DDP, would keep each rank's own initialisation of its shards: accelerate does
   the same); ``CPUOffloadPolicy`` keeps the sharded parameters,
   gradients and optimizer state in host memory. A frozen reference is sharded the same way.
   Generation under FSDP2 passes ``synced_gpus=True`` (transformers' flag for ZeRO-3 / FSDP:
   a rank that finished keeps stepping so the per-layer all-gathers stay matched).
4. The config's batch is the global batch. Each rank takes a contiguous ``1 / world`` slice
   of the step's rows (GRPO / RRHF: of its prompts, so a group never straddles ranks) and
   micro-batches of ``micro_batch_size / world`` units: the global micro-batch is the one
   process's. Both engines average gradients over ranks, so each micro-batch loss (a mean over
   its ``n_r`` local units or tokens) is multiplied by ``world * n_r / sum_r n_r`` (the counts
   all-reduced): the gradient is that of the global mean, as in one process.
5. Sampling RNG: every rank reseeds from ``(seed, rank)`` (numpy's ``SeedSequence``), so
   ranks sample differently and a run is reproducible from its seed.
6. Checkpoints: the model and optimizer state through ``torch.distributed.checkpoint``
   (``get_state_dict`` / ``set_state_dict``, each rank writes its shards), each rank's RNG state
   in ``rng-<rank>.pt``, step / history / config in rank 0's ``trainer_state.pt``. The
   ``save_pretrained`` export gathers a full state dict on rank 0's CPU
   (``StateDictOptions(full_state_dict=True, cpu_offload=True)``).
7. Rank 0 alone writes metrics, plots, summaries and run directories; metrics are the mean of
   each rank's step statistics (``tokens`` summed).
8. Several trainable modules (PPO's actor and critic) are wrapped as one ``ModuleDict`` root,
   and one root forward runs both: one DDP reducer, one FSDP2 root, one DeepSpeed engine.
9. Gradient accumulation: DDP's ``no_sync()`` on all but an update's last micro-batch (one
   all-reduce per update); DeepSpeed's ``set_gradient_accumulation_boundary``; FSDP2
   reduce-scatters each micro-batch (holding unsharded gradients would cost the memory it saves).
10. Batch statistics of a rollout (advantage whitening, REINFORCE baselines) are computed on
    every rank's rows at once (:meth:`Engine.on_all_rows`), as one process would.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

ENGINES = ("auto", "none", "ddp", "fsdp2", "deepspeed")


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun / accelerate launch set it (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_engine(kind: Optional[str]) -> str:
    """``auto`` -> ``ddp`` under a multi-process launcher, else ``none``; refuses ``none`` with several ranks."""
    kind = kind or "auto"
    if kind not in ENGINES:
        raise ValueError(f"distributed must be one of {ENGINES}, got {kind!r}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launched_world_size()
    if kind == "auto":
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # accelerate launch, DEEPSPEED config
            return "deepspeed"
        return "ddp" if world > 1 else "none"
    if kind == "none" and world > 1:
        raise ValueError(f"launched with WORLD_SIZE={world} but distributed='none': every rank would train on the "
                         "same rows without synchronising; pass --distributed ddp or --distributed fsdp2")
    return kind


def local_device(device: Optional[str] = None) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under a launcher with CUDA, else ``device`` or cpu."""
    if device is not None and device != "cuda":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(kind: Optional[str], device: Optional[torch.device] = None) -> str:
    """Resolve ``kind`` and start the default process group if it needs one (idempotent)."""
    kind = resolve_engine(kind)
    if kind == "deepspeed" and not dist.is_initialized():
        from .deepspeed_engine import init_process_group

        init_process_group(device)
    elif kind != "none" and not dist.is_initialized():
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return kind


def shutdown() -> None:
    """Destroy the default process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def main_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. a timestamped output directory)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RootForward(nn.Module):
    """The root module every engine wraps: ``forward(fn, *args)`` returns ``fn(self.model, *args)``.

    Losses, logprobs and generation are closures run through this forward, so DDP's and
    FSDP2's forward hooks fire and, under FSDP2, the root's parameters (lm_head included) are
    the all-gathered full tensors while ``fn`` runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: modules whose class is in ``_no_split_modules``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no _no_split_modules: cannot find its decoder layers to shard")
    return layers


class Engine:
    """One process's view of the job: its rank, the world, and how models are wrapped.

    ``kind``: ``none`` (one process, models left as they are), ``ddp``, ``fsdp2`` or
    ``deepspeed`` (:mod:`fastrlhf.algos.deepspeed_engine`). ``param_dtype``: FSDP2's compute
    dtype (None: the parameters' own). ``cpu_offload``: FSDP2's ``CPUOffloadPolicy``.
    ``deepspeed``: ``path`` (a DeepSpeed config file or None), ``micro_batch_size`` (per rank),
    ``max_grad_norm``.
    """

    def __init__(self, kind: str = "none", *, device: Optional[torch.device] = None,
                 param_dtype: Optional[torch.dtype] = None, cpu_offload: bool = False,
                 deepspeed: Optional[Mapping[str, Any]] = None):
        self.kind = init_distributed(kind, device)
        self.deepspeed = dict(deepspeed or {})
        if cpu_offload and self.kind != "fsdp2":
            raise ValueError("cpu_offload needs distributed='fsdp2' (FSDP2's CPUOffloadPolicy; with DeepSpeed, put "
                             "offload_param / offload_optimizer in --deepspeed-config); "
                             "one process: torchrun --nproc_per_node 1 ... --distributed fsdp2 --cpu-offload")
        self.device = device
        self.param_dtype = param_dtype
        self.cpu_offload = cpu_offload
        self.rank = rank()
        self.world = world_size()
        self._depth = 0  # > 0 while a root forward runs (:meth:`call`)

    def check_inside(self, what: str) -> None:
        """RuntimeError unless a root forward is running (or there is no engine): a wrapped model
        called from outside would skip DDP's gradient all-reduce or meet FSDP2's sharded parameters."""
        if self.kind != "none" and self._depth == 0:
            raise RuntimeError(f"{what} called outside the engine's root forward under {self.kind}: run it "
                               "through Trainer.call / completion_forward so the engine's hooks fire")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ------------------------------------------------------------------------------

    def local_count(self, n: int, what: str) -> int:
        """``n / world``; ValueError naming ``what`` when ``n`` does not split evenly over the ranks."""
        if n % self.world:
            raise ValueError(f"{what} = {n} must be a multiple of the number of processes ({self.world}): "
                             "the config's batch is the global batch, split evenly over the ranks")
        return n // self.world

    def shard(self, rows: Sequence[Any]) -> List[Any]:
        """This rank's contiguous ``1 / world`` slice of ``rows``."""
        n = self.local_count(len(rows), "rows per step")
        return list(rows[self.rank * n : (self.rank + 1) * n])

    def seed_rank(self, seed: int) -> None:
        """Reseed torch / numpy / random from ``(seed, rank)``: per-rank sampling, reproducible from the seed."""
        import random

        s = int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    # -- collectives -----------------------------------------------------------------------

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over ranks (one all-reduce of a float64 vector)."""
        if self.world == 1:
            return [float(v) for v in values]
        dev = self.device if self.device is not None and dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return t.tolist()

    def mean_stats(self, stats: Mapping[str, float]) -> Dict[str, float]:
        """Each statistic averaged over ranks; ``tokens`` (a count) summed."""
        if self.world == 1:
            return dict(stats)
        keys = sorted(stats)
        total = self.all_sum([stats[k] for k in keys])
        return {k: v if k == "tokens" else v / self.world for k, v in zip(keys, total)}

    # -- models ----------------------------------------------------------------------------

    def wrap(self, model: nn.Module, *, trainable: bool = True, optimizer=None) -> Optional[nn.Module]:
        """The root module to run ``model`` through (None for ``none``: call the model directly).

        DDP wraps only a trainable model (a frozen replica needs no gradient sync); FSDP2 shards
        both, layer by layer and then the root; DeepSpeed partitions both (``optimizer``: the
        trainable model's, built before and wrapped by DeepSpeed).
        """
        if self.kind == "none":
            return None
        root = RootForward(model)
        if self.kind in ("fsdp2", "deepspeed"):
            # both keep each rank's own values of its shards (DDP broadcasts rank 0's): start from rank 0's
            # model, as accelerate's FSDP2 preparation does, so that randomly initialised parts (LoRA's A
            # matrices, new heads) agree across ranks
            nccl = dist.get_backend() == "nccl"  # NCCL moves CUDA tensors only: a host tensor goes through the GPU
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    if nccl and t.device.type != "cuda":
                        buf = t.data.to(self.device)
                        dist.broadcast(buf, src=0)
                        t.data.copy_(buf)
                    else:
                        dist.broadcast(t.data, src=0)
        if self.kind == "deepspeed":
            from . import deepspeed_engine

            if trainable and optimizer is None:
                raise ValueError("distributed='deepspeed' wraps a trainable model together with its optimizer")
            cfg = deepspeed_engine.ds_config(self.deepspeed.get("path"), trainable=trainable,
                                             micro_batch_size=self.deepspeed.get("micro_batch_size", 1),
                                             max_grad_norm=self.deepspeed.get("max_grad_norm"))
            return deepspeed_engine.initialize(root, model, cfg, optimizer if trainable else None)
        if self.kind == "ddp":
            if not trainable:
                return root
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
            # forward_sync_buffers=False: the only buffers are rotary tables, equal on every rank
            return DDP(root, device_ids=ids, forward_sync_buffers=False)
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        kw = {}
        if self.device is not None and self.device.type == "cuda":  # host parameters move to the GPU shard by shard
            from torch.distributed.device_mesh import init_device_mesh

            if getattr(self, "_mesh", None) is None:
                torch.cuda.set_device(self.device)  # the mesh (and FSDP2's shards) on this rank's GPU
                self._mesh = init_device_mesh("cuda", (self.world,))
            kw["mesh"] = self._mesh
        kw.update(mp_policy=MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload
                  else OffloadPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(root, **kw)
        return root

    def call(self, root: Optional[nn.Module], model: nn.Module, fn, *args):
        """``fn(model, *args)``, through ``root`` (the :meth:`wrap` of ``model`` or of a container
        holding it) when there is one."""
        if root is None:
            return fn(model, *args)
        self._depth += 1
        try:
            # a 1-tuple: DeepSpeed's forward hooks walk the output and accept only tensors or containers
            out = root(lambda _root_module, *a: (fn(model, *a),), *args)[0]
        finally:
            self._depth -= 1
        if self.kind == "fsdp2" and not torch.is_grad_enabled():
            root.reshard()  # FSDP2 keeps the root gathered after a forward, waiting for a backward that won't come
        return out

    def micro_batch(self, root: Optional[nn.Module], last: bool):
        """The context of one micro-batch's forward and backward; ``last``: the last of its update.

        DDP: ``no_sync()`` on all but the last, so gradients accumulate locally and are
        all-reduced once per update (DDP's own recipe for gradient accumulation). DeepSpeed:
        ``set_gradient_accumulation_boundary(last)``. FSDP2 keeps reduce-scattering every
        micro-batch: skipping it would hold the full unsharded gradients, the memory FSDP
        exists to save.
        """
        if root is not None and self.kind == "ddp" and not last:
            return root.no_sync()
        if root is not None and self.kind == "deepspeed":
            root.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, root: Optional[nn.Module], loss: torch.Tensor) -> None:
        """``loss.backward()``; DeepSpeed: ``engine.backward(loss, scale_wrt_gas=False)`` (the scaling is ours)."""
        if root is not None and self.kind == "deepspeed":
            root.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def step(self, root: nn.Module) -> torch.Tensor:
        """DeepSpeed's ``engine.step()`` (clip, update, zero the gradients); returns the pre-clip norm."""
        root.step()
        norm = root.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def full_state_dict(self, root: nn.Module, prefix: str = "model.") -> Optional[Dict[str, torch.Tensor]]:
        """The wrapped model's full state dict on rank 0's CPU (None on the other ranks); a collective.

        Only the entries under ``prefix`` (RootForward's ``model.``; ``model.policy.`` where the
        root holds several modules), with the prefix removed.
        """
        if self.kind == "deepspeed":
            from .deepspeed_engine import full_state_dict

            sd = full_state_dict(root, self.is_main)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    def on_all_rows(self, fn, *tensors: Optional[torch.Tensor]):
        """``fn(*tensors)`` computed on every rank's rows at once; this rank's rows of each result.

        For the statistics a rollout's advantages take over the whole batch (PPO's whitening,
        REINFORCE's batch-mean baseline, REINFORCE++'s global whitening): the same numbers as
        one process with the global batch. Each tensor is ``[b, ...]`` (None passes through);
        ``[b, T]`` tensors whose ``T`` differs across ranks (right-padded completions) are
        zero-padded to the longest ``T``, and 2-D results are cut back to this rank's ``T``.
        Rows are small (``[B, R]`` floats), so they travel by ``all_gather_object``.
        """
        if self.world == 1:
            return fn(*tensors)
        local = [None if t is None else t.detach().cpu() for t in tensors]
        boxes: List[Any] = [None] * self.world
        dist.all_gather_object(boxes, local)
        rows = [next(p.shape[0] for p in box if p is not None) for box in boxes]
        glob = []
        for i, t in enumerate(tensors):
            if t is None:
                glob.append(None)
                continue
            parts = [box[i] for box in boxes]
            if t.dim() == 2:
                width = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
            glob.append(torch.cat(parts).to(t.device))
        out = fn(*glob)
        start = sum(rows[: self.rank])
        stop = start + rows[self.rank]

        def cut(r: torch.Tensor) -> torch.Tensor:
            r = r[start:stop]
            if r.dim() == 2:
                width = next((t.shape[1] for t in tensors if t is not None and t.dim() == 2), r.shape[1])
                r = r[:, :width]
            return r

        return tuple(cut(r) for r in out) if isinstance(out, tuple) else cut(out)

    def gather(self, items: Sequence[Any]) -> List[Any]:
        """Every rank's ``items`` (picklable), concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        boxes: List[Any] = [None] * self.world
        dist.all_gather_object(boxes, list(items))
        return [x for box in boxes for x in box]

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, path: str, root: nn.Module, optimizer, meta: Mapping[str, Any],
                        rng: Mapping[str, Any]) -> None:
        """Sharded model + optimizer state under ``path/dcp``, this rank's RNG, rank 0's ``meta``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        os.makedirs(path, exist_ok=True)
        if self.kind == "deepspeed":  # DeepSpeed's own checkpoint: each rank writes its partitions
            root.save_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        else:
            msd, osd = get_state_dict(root, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(path, "dcp"))
        torch.save(dict(rng), os.path.join(path, f"rng-{self.rank}.pt"))
        if self.is_main:
            torch.save(dict(meta), os.path.join(path, "trainer_state.pt"))
        barrier()

    def load_checkpoint(self, path: str, root: nn.Module, optimizer) -> Dict[str, Any]:
        """Restore :meth:`save_checkpoint`'s model and optimizer state; returns ``meta`` with this rank's ``rng``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        sub = "deepspeed" if self.kind == "deepspeed" else "dcp"
        if not os.path.isdir(os.path.join(path, sub)):
            other = "dcp" if sub == "deepspeed" else "deepspeed"
            hint = (f"it was saved with --distributed {'deepspeed' if other == 'deepspeed' else 'ddp|fsdp2'}"
                    if os.path.isdir(os.path.join(path, other)) else "not a checkpoint of a distributed run")
            raise FileNotFoundError(f"{path!r} has no {sub}/ directory: {hint}")
        rng_file = os.path.join(path, f"rng-{self.rank}.pt")
        if self.all_sum([not os.path.exists(rng_file)])[0] > 0:  # every rank raises, none waits in a collective
            raise ValueError(f"{path!r} was saved by fewer processes than the {self.world} running now")
        if self.kind == "deepspeed":
            root.load_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        else:
            msd, osd = get_state_dict(root, optimizer)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
            set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        meta["rng"] = torch.load(rng_file, map_location="cpu", weights_only=False)
        return meta
