"""Training metrics: expert-load statistics and rank-0 MLflow logging (plain ``mlflow`` calls)."""

from __future__ import annotations

import math
from typing import Any

from diffmoe.model.router import expert_counts, score_distribution
from diffmoe.parallel import LLaDAGate


def expert_load_metrics(model) -> dict[str, float]:
    """Per MoE layer: max/mean expert load (1.0 = perfectly balanced) over the experts the last
    forward actually chose on this rank, and mean router entropy (nats; log(E) = uniform)."""
    out: dict[str, float] = {}
    layer = 0
    for module in model.modules():
        if isinstance(module, LLaDAGate) and module.routing is not None:
            logits = module.routing.logits.detach()
            counts = expert_counts(module.routing.expert_idx, logits.shape[-1])
            probs = score_distribution(logits, module.options.score_function)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            out[f"moe/layer{layer}/max_mean_load"] = float(counts.max() / counts.mean().clamp_min(1e-9))
            out[f"moe/layer{layer}/router_entropy"] = float(entropy)
            layer += 1
    if layer:
        loads = [v for k, v in out.items() if k.endswith("max_mean_load")]
        out["moe/max_mean_load"] = max(loads)
    return out


class MetricsLogger:
    """Logs to the MLflow run the driver created (rank 0 only); prints a compact line per log."""

    def __init__(self, loop_config: dict[str, Any], rank: int, world: int, enabled: bool):
        self.enabled = enabled and bool(loop_config.get("mlflow_run_id"))
        self.rank = rank
        if not self.enabled:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        self.run = mlflow.start_run(
            run_id=loop_config["mlflow_run_id"],
            log_system_metrics=loop_config.get("log_system_metrics", False),
        )
        mlflow.set_tag("workers", str(world))

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if self.rank == 0:
            shown = {
                k: round(v, 4)
                for k, v in clean.items()
                if k.startswith(("train/loss", "val/", "train/tokens", "train/nonfinite"))
            }
            dropped = {k: v for k, v in metrics.items() if k not in clean}
            print(
                f"step {step}: {shown}" + (f" not logged (non-finite): {dropped}" if dropped else ""),
                flush=True,
            )
        if self.enabled:
            self.mlflow.log_metrics(clean, step=step, synchronous=False)  # never stall a training step

    def event(self, name: str, info: dict[str, Any]) -> None:
        """The latest ``info`` of a recurring event, as tag ``<name>.last``."""
        self.tag(f"{name}.last", str(info), shown=name)

    def tag(self, key: str, value: str, shown: str | None = None) -> None:
        if self.rank == 0:
            print(f"{shown or key}: {value}", flush=True)
        if self.enabled:
            self.mlflow.set_tag(key, value)

    def flush(self) -> None:
        if self.enabled:
            self.mlflow.flush_async_logging()

    def close(self) -> None:
        if self.enabled:
            self.mlflow.flush_async_logging()
            self.mlflow.end_run()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, max_steps: int, start_step: int, elapsed_s: float, loss, tokens_per_s) -> str:
    """One human line for the job log: step, loss, tokens/s, elapsed and ETA (from this session's
    steps per second, so a resumed run does not count the steps it skipped)."""
    done = max(step - start_step, 0)
    eta = "?" if done == 0 else _duration(elapsed_s / done * max(max_steps - step, 0))
    loss_text = "?" if loss is None else f"{loss:.4f}"
    rate = "?" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
    pct = 100.0 * step / max_steps
    return (
        f"progress: step {step}/{max_steps} ({pct:.0f}%) loss {loss_text} tokens/s {rate} "
        f"elapsed {_duration(elapsed_s)} eta {eta}"
    )
