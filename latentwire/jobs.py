"""Every Ray Train job: one launcher, one checkpoint format, one registry.

A training job is a `TrainJob` subclass registered in `TRAIN_JOBS` under the name its CLI dispatch
uses (`bridge-perceiver`, `bridge-aligned`, `sidecar`). The job module keeps its model code and its
per-worker loop; this module owns everything Ray Train asks of a job:

- driver: `launch(job, config, ...)` builds the `TorchTrainer` (ScalingConfig, RunConfig,
  FailureConfig, CheckpointConfig) on the cluster of `latentwire.raycluster`, and returns Ray's
  `Result`. The driver's own environment is never changed: the workers get this checkout on their
  PYTHONPATH and their thread count through Ray runtime envs.
- workers: `restored_checkpoint(resume)` gives the directory to continue from (Ray's latest one after
  a worker failure or a rerun under the same name, else `--resume`), `save_checkpoint` /
  `load_checkpoint` write and read the checkpoint format, `report` reports metrics (with a
  checkpoint on rank 0).

A checkpoint directory holds, never anything pickled:

    MODEL.safetensors + .json      the model, written by its own save() (loadable on its own)
    optimizer.safetensors + .json  the optimizer's state tensors; its param groups in the manifest
    NAME.safetensors + .json       any other tensors the job resumes from (the ridge fit's moments)
    train_state.json               step, config, metrics, data, history, and the sha256 of every
                                   .safetensors file above, checked again on load

Ray, torch and safetensors are imported inside the functions: importing this module (the CLI's
job dispatch) costs nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from latentwire.registry import Registry

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE_PATH = str(Path.home() / ".cache" / "latentwire" / "ray-results")
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class TrainJob:
    """One kind of training job. A subclass names its config dataclass, the checkpoint file it
    exports, its per-worker loop and its driver, and registers: `@TRAIN_JOBS.register("name")`."""

    name: ClassVar[str] = ""  # set by the registration below; also the default run-name prefix
    config: ClassVar[type]  # its config dataclass; the workers receive it as a dict
    exports: ClassVar[str]  # the checkpoint file that is the job's product (e.g. "bridge.safetensors")
    score: ClassVar[str | None] = None  # the metric that ranks checkpoints (lower is better); None: the latest
    keep_checkpoints: ClassVar[int | None] = 2  # checkpoints Ray keeps (None: all)

    @staticmethod
    def loop(config: dict) -> None:
        """Runs on every Ray Train worker. `config` is {"config": asdict(cfg), "resume": dir | None,
        **inputs}: rebuild the dataclass with `job_config(config, Job.config)`."""
        raise NotImplementedError

    @staticmethod
    def run(cfg, **options) -> dict:
        """The driver: prepare the inputs, `launch`, export `exports` of the chosen checkpoint; returns
        a JSON-able summary."""
        raise NotImplementedError


class _Registry(Registry[type[TrainJob]]):
    """The registry of jobs; each job learns its own name from its registration."""

    def register(self, name: str) -> Callable[[type[TrainJob]], type[TrainJob]]:
        add = super().register(name)

        def named(job: type[TrainJob]) -> type[TrainJob]:
            job.name = name
            return add(job)

        return named


TRAIN_JOBS = _Registry("training job")


class JobError(RuntimeError):
    """A job that ran but left nothing to export."""


# ---- driver --------------------------------------------------------------------------------
def worker_env(threads: int) -> dict[str, str]:
    """Environment of the job's processes: this checkout first on the path, `threads` BLAS threads."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def launch(job: type[TrainJob] | str, config: Any, *, num_workers: int = 1, use_gpu: bool = False,
           storage_path: str | None = None, resume: str | None = None, max_failures: int = 2,
           name: str | None = None, threads: int = 1, inputs: dict | None = None):
    """Run `job` with `config` as a TorchTrainer job and return Ray's `Result` (with a checkpoint).

    `resume`: a checkpoint directory to continue from (a rerun under the same `name` and
    `storage_path` continues from that run's latest checkpoint without it). `inputs`: prepared on
    the driver (paths of cached data), passed to every worker beside the config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from latentwire.raycluster import init_for_training

    job = TRAIN_JOBS.get(job) if isinstance(job, str) else job
    env = worker_env(threads)
    init_for_training(num_cpus=max(2, num_workers), env=env)
    trainer = TorchTrainer(
        job.loop,
        train_loop_config={"config": asdict(config), "resume": str(Path(resume).resolve()) if resume else None,
                           **(inputs or {})},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, **_coordinator_resources()),
        run_config=RunConfig(name=name or f"{job.name}-{int(time.time())}",
                             storage_path=storage_path or DEFAULT_STORAGE_PATH,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints,
                                                                checkpoint_score_attribute=job.score,
                                                                checkpoint_score_order="min"),
                             worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise JobError(f"training job {job.name} reported no checkpoint")
    return result


def _coordinator_resources() -> dict:
    """Ray Train V1 reserves a CPU for its coordinator, so 2 workers never fit on 2 cores unless it
    gets none; V2 (Ray's default) reserves none and refuses `trainer_resources`."""
    from ray.train.v2._internal.constants import is_v2_enabled

    return {} if is_v2_enabled() else {"trainer_resources": {"CPU": 0}}


# ---- workers -------------------------------------------------------------------------------
def job_config(config: dict, cls: type):
    """The job's config dataclass from a worker's loop config."""
    return cls(**config["config"])


def is_restart() -> bool:
    """Whether Ray handed this worker a checkpoint (a restart after a failure, or a rerun of a run
    name that has one), as opposed to a fresh start or `--resume`."""
    import ray.train

    return ray.train.get_checkpoint() is not None


@contextmanager
def restored_checkpoint(resume: str | None = None) -> Iterator[Path | None]:
    """The checkpoint directory a worker continues from: Ray's latest one, else `resume`, else None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            yield Path(d)
    else:
        yield Path(resume) if resume else None


def report(metrics: dict, write: Callable[[Path], Any] | None = None) -> None:
    """`ray.train.report` from a worker; every rank reports each round (a report is collective).
    With `write` (rank 0), `write(directory)` fills a fresh directory that is reported as a checkpoint."""
    import ray.train

    if write is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        write(Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def save_checkpoint(directory: str | Path, *, step: int, config: dict, metrics: dict, optimizer=None,
                    tensors: dict[str, dict] | None = None, data: dict | None = None,
                    history: list[dict] | None = None) -> dict:
    """Write the optimizer state and `tensors` (name -> {key: tensor}) as safetensors into
    `directory`, beside the model file(s) already there, then train_state.json with the sha256 of
    every .safetensors file in it. Returns that state."""
    from latentwire import weights

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        state = optimizer.state_dict()
        flat = {f"{pid}.{key}": _as_tensor(val) for pid, st in state["state"].items() for key, val in st.items()}
        weights.save(d / OPTIMIZER_FILE, flat, kind="optimizer", config={"param_groups": state["param_groups"]})
    for name, group in (tensors or {}).items():
        weights.save(d / f"{name}.safetensors", group, kind=f"checkpoint-{name}", config={})
    state = {"step": step, "config": config, "metrics": metrics, "data": data or {}, "history": history or [],
             "tensors": sorted(tensors or {}),
             "files": {p.name: weights.sha256_file(p) for p in sorted(d.glob("*.safetensors"))}}
    (d / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    return state


def load_checkpoint(directory: str | Path, optimizer=None) -> dict:
    """Read train_state.json, check every listed file's sha256, restore `optimizer` (if given) and
    return the state with "tensors": {name: {key: tensor}} loaded. Model files are the caller's
    to load (their own `load`, sha-checked against their manifest)."""
    from latentwire import weights
    from latentwire.weights import WeightsError

    d = Path(directory)
    if not (d / STATE_FILE).exists():
        raise WeightsError(f"{d}: not a training checkpoint ({STATE_FILE} missing)")
    state = json.loads((d / STATE_FILE).read_text())
    for name, digest in state["files"].items():
        if not (d / name).exists() or weights.sha256_file(d / name) != digest:
            raise WeightsError(f"{d / name}: missing or its sha256 differs from {STATE_FILE}; refusing to resume")
    if optimizer is not None and OPTIMIZER_FILE in state["files"]:
        flat, man = weights.load(d / OPTIMIZER_FILE, kind="optimizer")
        opt_state: dict = {}
        for key, val in flat.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = val
        optimizer.load_state_dict({"state": opt_state, "param_groups": man["config"]["param_groups"]})
    state["tensors"] = {name: weights.load(d / f"{name}.safetensors", kind=f"checkpoint-{name}")[0]
                        for name in state["tensors"]}
    return state


def _as_tensor(value):
    import torch

    return value.detach() if torch.is_tensor(value) else torch.as_tensor(value)
