"""Expert-parallel model replicas: K Ray actors hold 1/K of every MoE layer's experts each.

The replica keeps the engine (scheduling, canvases) and hands each forward pass to
``ExpertParallelModel``, a stand-in for the model that splits the batch's rows across the K workers.
KV caches stay where they are computed: each worker keeps the caches of the rows pinned to it
(block diffusion and the AR twin: ``block_step``; masked diffusion's window caches: ``window_full``
and ``window_cached``), and only token ids, masks and per-row lengths travel per step.
Workers run the backbone only and send back final hidden states (bf16 on GPU), never
vocabulary-wide logits: the replica holds the LM head and applies it only at the positions the
sampler reads (``sampler.block_logits``), which for a 157k vocabulary is ~77x fewer bytes per
position through the object store, and none at all for prompt prefill.
Every worker runs the DeepSpeed-MoE model of ``diffmoe.parallel``, the one training uses (attention
and dense parts replicated, local experts only); inside each MoE layer tokens travel to their experts' rank
and back with ``all_to_all`` over ``torch.distributed`` (gloo on CPU, NCCL on GPU). All ranks must
run every forward in lockstep, so a rank without rows gets a dummy row whose output is dropped.
Workers are placed in the replica's placement group (``placement_group_bundles``), bundle i for rank i.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import ray
import torch
from torch import nn

from diffmoe.generation.block_cache import HeldRows, RowRouter, feeds_apart
from diffmoe.generation.remote_cache import WindowHolder


@ray.remote
class ExpertParallelWorker:
    """One rank of an expert-parallel replica."""

    def __init__(self, rank: int, world: int, threads: int | None = None):
        self.rank, self.world = rank, world
        if threads:
            torch.set_num_threads(threads)
        self.backbone = None

    def address(self) -> tuple[str, int]:
        """Rendezvous address for the process group (rank 0's node, a free port)."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def setup(self, master: tuple[str, int], source: str, tracking_uri: str | None) -> int:
        """Join the process group and load this rank's share of the weights; returns local experts."""
        from diffmoe.model.checkpoint import load_config
        from diffmoe.model.source import resolve
        from diffmoe.parallel import build_training_model, init_distributed, load_published_directory

        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world),
            LOCAL_RANK="0",
        )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        init_distributed(backend)
        directory = resolve(source, tracking_uri)
        config = load_config(directory)
        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        # Only this rank's share is ever allocated (bf16 on the GPU), and filled shard by shard.
        dtype = torch.bfloat16 if backend == "nccl" else None
        model = build_training_model(config, self.world, device=self.device, dtype=dtype)
        load_published_directory(model, directory)
        self.backbone = model.model.eval()  # the LM head lives on the replica
        del model
        self.held = HeldRows()  # block diffusion: this rank's rows' caches, kept here
        self.windows = WindowHolder()  # masked diffusion: this rank's rows' window caches
        return config.num_experts // self.world

    @torch.inference_mode()
    def forward(self, ids, attention_mask, position_ids, past, use_cache):
        """The backbone on this rank's rows: (final hidden states, layer caches), on the CPU."""
        dev = self.device
        past = None if past is None else [(k.to(dev), v.to(dev)) for k, v in past]
        out = self.backbone(
            ids.to(dev),
            attention_mask=None if attention_mask is None else attention_mask.to(dev),
            position_ids=None if position_ids is None else position_ids.to(dev),
            past_key_values=past,
            use_cache=use_cache,
        )
        kv = out.past_key_values if use_cache else None
        kv = None if kv is None else [(k.cpu(), v.cpu()) for k, v in kv]
        return out.last_hidden_state.cpu(), kv

    def evict(self, keys) -> None:
        self.held.evict(keys)
        self.windows.evict(keys)

    def _dummy(self, ids, evict, forwards: int = 1):
        """A rank without rows still runs (the all-to-alls need every rank): one token each time."""
        self.evict(evict)
        for _ in range(forwards):
            self.backbone(ids[:1, :1].to(self.device))

    def _agree(self, forwards: int) -> int:
        """The most forwards any rank runs this step (every rank calls this, in the same order)."""
        import torch.distributed as dist

        n = torch.tensor([forwards], device=self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n.item())

    @torch.inference_mode()
    def block_step(self, ids, plans, evict, apart: bool = False):
        """One block-diffusion step of this rank's rows over the caches it keeps (``HeldRows``):
        (final hidden states on the CPU, forwards run). ``apart`` (the same on every rank): rows
        feeding a prompt run apart from decoding rows, the ranks agreeing on how many forwards."""
        agree = self._agree if apart else None
        if not plans:
            self._dummy(ids, evict, agree(1) if agree else 1)
            return None
        self.held.evict(evict)
        hidden = self.held.step(self.backbone, ids, plans, apart, agree).cpu()
        return hidden, self.held.forwards

    @torch.inference_mode()
    def window_full(self, ids, key_mask, index, keeps, evict):
        """Masked diffusion's full pass on this rank's rows, keeping their window caches here."""
        if not keeps:
            return self._dummy(ids, evict)
        self.windows.evict(evict)
        return self.windows.full(self.backbone, ids, key_mask, index, keeps).cpu()

    @torch.inference_mode()
    def window_cached(self, ids, fed_mask, positions, index, rows, evict):
        """Masked diffusion's cached step on this rank's rows over the window caches kept here."""
        if not rows:
            return self._dummy(ids, evict)
        self.windows.evict(evict)
        return self.windows.cached(self.backbone, ids, fed_mask, positions, index, rows).cpu()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _split(t, parts: int):
    return None if t is None else list(torch.tensor_split(t, parts, dim=0))


class ExpertParallelModel(nn.Module):
    """What the engine sees as ``model``: ``model.model`` (the backbone) fans the rows out to the
    workers and gathers hidden states and caches back in row order; ``lm_head`` runs here, on the
    replica's device (its GPU when it has one), only where the sampler needs logits.

    Decoding goes through ``block_step`` (LLaDA2.x, the AR twin) or ``window_full`` /
    ``window_cached`` (LLaDA-MoE) instead: each row is pinned to one worker for its life and its keys/values stay
    there, so a step sends token ids and per-row lengths and gets hidden states back; the caches
    never cross processes."""

    keeps_block_cache = True  # block diffusion and the AR twin: each row's cache stays on its worker
    keeps_row_caches = True  # masked diffusion: each row's window cache stays on its worker

    def __init__(self, workers: list, config, lm_head_weight: torch.Tensor):
        super().__init__()
        self.workers, self.config = workers, config
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.lm_head = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype
        )
        with torch.no_grad():
            self.lm_head.weight.copy_(lm_head_weight)
        self.model = _Backbone(workers, device, dtype)  # not a submodule: it owns no parameters
        self.router = RowRouter(len(workers))
        self.step_forwards = 1  # forwards the last block step ran on each worker

    @classmethod
    def start(
        cls,
        config,
        ep_size: int,
        source: str,
        tracking_uri: str | None,
        worker_cpus: float,
        worker_gpus: float = 0.0,
        directory=None,
        rank0_gpus: float | None = None,
    ):
        """Start K workers in the current placement group (bundle i for rank i) and load them; the
        replica reads the LM head from ``directory`` (``source`` resolved, by default). Rank 0 takes
        ``rank0_gpus`` (default ``worker_gpus``): less when it shares its GPU with the replica."""
        import uuid

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from diffmoe.model.checkpoint import read_tensor
        from diffmoe.model.source import resolve

        pg = ray.util.get_current_placement_group()
        workers, group = [], uuid.uuid4().hex[:8]
        for rank in range(ep_size):
            # Named so an operator (or a fault test) can find one rank: diffmoe-ep-<group>-r<rank>.
            opts: dict = {
                "num_cpus": worker_cpus,
                "num_gpus": worker_gpus if rank or rank0_gpus is None else rank0_gpus,
                "name": f"diffmoe-ep-{group}-r{rank}",
            }
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                )
            threads = max(1, int(worker_cpus))
            workers.append(ExpertParallelWorker.options(**opts).remote(rank, ep_size, threads))
        master = ray.get(workers[0].address.remote())
        local = ray.get([w.setup.remote(master, source, tracking_uri) for w in workers])
        directory = directory or resolve(source, tracking_uri)
        model = cls(workers, config, read_tensor(directory, "lm_head.weight"))
        model.experts_per_worker = local
        return model

    def forward(self, ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        """Logits at every position (callers that want fewer use ``model`` + ``lm_head``)."""
        out = self.model(ids, attention_mask, position_ids, past_key_values, use_cache)
        return SimpleNamespace(
            logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values
        )

    def block_step(self, ids, plans, evict, apart: bool = False):
        """Final hidden states [R, width, hidden] of one block-diffusion step, rows on their
        workers (see the class docstring); ``evict``: cache keys of rows that are gone. ``apart``:
        when the step mixes prompt feeders and decoding rows, each worker runs them in forwards
        of their own (``step_forwards``: how many)."""
        apart = apart and feeds_apart(plans)
        out = self._on_ranks("block_step", plans, evict, ids, apart=apart)  # (hidden, forwards) each
        self.step_forwards = max(n for _, n in out.values())
        return self._in_row_order({idx: hidden for idx, (hidden, _) in out.items()}, len(plans))

    def window_full(self, ids, key_mask, index, keeps, evict):
        """Masked diffusion's full pass: each worker keeps its rows' caches outside their windows
        (``RowKeep``); final hidden states at ``index`` [R, n] come back."""
        return self._in_row_order(
            self._on_ranks("window_full", keeps, evict, ids, key_mask, index), len(keeps)
        )

    def window_cached(self, ids, fed_mask, positions, index, rows, evict):
        """Masked diffusion's cached step: windows out, read over the caches the workers keep."""
        out = self._on_ranks("window_cached", rows, evict, ids, fed_mask, positions, index)
        return self._in_row_order(out, len(rows))

    def _on_ranks(self, method: str, items, evict, *tensors, **options) -> dict:
        """Call the workers' ``method`` with their pinned rows' slices of ``tensors`` and of
        ``items`` (anything with a cache ``key``) and the evicted keys they hold; a worker without
        rows gets row 0 as a dummy (the all-to-alls need every rank). Returns {row indices: what
        the worker returned} for the workers with rows."""
        rows, drops = self.router.route(items, evict)
        refs = [
            getattr(worker, method).remote(
                *[t[idx] if idx else t[:1] for t in tensors], [items[i] for i in idx], drop, **options
            )
            for worker, idx, drop in zip(self.workers, rows, drops)
        ]
        return {tuple(idx): part for idx, part in zip(rows, ray.get(refs)) if idx}

    def _in_row_order(self, parts: dict, n: int) -> torch.Tensor:
        """The workers' hidden states ({row indices: tensor}, as ``_on_ranks`` returns them) as one
        tensor in row order, on the replica's device."""
        out = None
        for idx, part in parts.items():
            if out is None:
                out = part.new_empty(n, *part.shape[1:])
            out[list(idx)] = part
        return out.to(self.model.device, self.model.dtype)

    def release(self, keys) -> None:
        """Evict these rows' caches from the workers that hold them (no forward, no collective)."""
        _, drops = self.router.route([], keys)
        ray.get([w.evict.remote(d) for w, d in zip(self.workers, drops) if d])

    async def ping(self) -> None:
        """Raises if a worker is dead (Ray's actor-ready probe; queued behind a running forward)."""
        import asyncio

        await asyncio.gather(*[w.__ray_ready__.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.get(w.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            ray.kill(w)


class _Backbone:
    """The workers as one backbone: ``(ids, ...) -> last_hidden_state, past_key_values`` with rows
    split across ranks (a rank without rows runs a dummy row, dropped: every rank must take part in
    every all-to-all). Inputs go to the workers on the CPU; results come back on ``device``."""

    def __init__(self, workers: list, device: torch.device, dtype: torch.dtype):
        self.workers, self.device, self.dtype = workers, device, dtype

    def __call__(self, ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        k, rows = len(self.workers), ids.shape[0]
        cpu = [None if t is None else t.cpu() for t in (ids, attention_mask, position_ids)]
        ids, attention_mask, position_ids = cpu
        if past_key_values is not None:
            past_key_values = [(kk.cpu(), vv.cpu()) for kk, vv in past_key_values]
        shards = {"ids": _split(ids, k), "mask": _split(attention_mask, k), "pos": _split(position_ids, k)}
        pasts = None
        if past_key_values is not None:
            per_layer = [(_split(kk, k), _split(vv, k)) for kk, vv in past_key_values]
            pasts = [[(kk[r], vv[r]) for kk, vv in per_layer] for r in range(k)]
        refs, real = [], []
        for r, worker in enumerate(self.workers):
            idle = shards["ids"][r].shape[0] == 0  # fewer rows than ranks: a dummy row (row 0)

            def pick(part, whole, idle=idle, r=r):
                if part is None:
                    return None
                return whole[:1] if idle else part[r]

            past = None
            if pasts is not None:
                past = [(kk[:1], vv[:1]) for kk, vv in past_key_values] if idle else pasts[r]
            real.append(not idle)
            refs.append(
                worker.forward.remote(
                    pick(shards["ids"], ids),
                    pick(shards["mask"], attention_mask),
                    pick(shards["pos"], position_ids),
                    past,
                    use_cache,
                )
            )
        outs = [o for o, keep in zip(ray.get(refs), real) if keep]
        hidden = torch.cat([o[0] for o in outs]).to(self.device, self.dtype)
        assert hidden.shape[0] == rows
        kv = None
        if use_cache:
            kv = [
                (
                    torch.cat([o[1][i][0] for o in outs]).to(self.device),
                    torch.cat([o[1][i][1] for o in outs]).to(self.device),
                )
                for i in range(len(outs[0][1]))
            ]
        return SimpleNamespace(last_hidden_state=hidden, past_key_values=kv)
