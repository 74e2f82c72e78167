"""Training a Switch Transformer with any routing estimator: `gradest run` (docs/estimators.md §5).

One loop serves both tasks. A `Task` knows its data and how to score a batch: `lm` (tiny-shakespeare, characters)
and `mt` (Multi30k En-De, BPE, BLEU). Each step's loss is the mean cross-entropy plus the MoE layers' auxiliary
losses; a score-function estimator (REINFORCE) adds its surrogate term over each sequence's loss. Everything that
decides the next step — model, optimiser, scheduler, the data generator and the RNG the estimators draw from — is
checkpointed, so a resumed run reproduces the uninterrupted one exactly on the CPU.

The run's settings are a `TrainConfig` (gradest.config), its task a `LanguageModelling` or `Translation`
(gradest.tasks). Hugging Face models (`gradest run --hf ARCH | --hf-config FILE | --hf-model DIR`): the lm task
trains a transformers MoE causal LM instead (gradest.hf.train: `HFLanguageModelling`, `HFCausalLM`), with the same
loop, files and resume.

Data parallel: `torchrun --nproc-per-node N -m gradest.cli run ...` runs N ranks (gloo on the CPU, nccl on CUDA).
Every rank draws the same global batch and trains on its share of the sequences; DistributedDataParallel averages
the gradients, so they equal one process's on the whole batch, except through what is computed per rank: the
load-balancing loss (per device, as in Switch and fairseq), REINFORCE's batch-mean baseline and the routing noise.
Only rank 0 writes files.

Stopping: under `gradest run` (`Trainer.run(handle_signals=True)`) SIGINT (Ctrl-C) or SIGTERM stops a run after the
step under way, with its checkpoint and metrics written (`Interrupted`). A step whose loss, gradients or parameters
are not finite stops it with `Diverged`, and no checkpoint is ever written with non-finite parameters (the last good
one stays).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradest.config import DTYPES, TrainConfig  # TrainConfig stays importable from here too
from gradest.devices import check_device, world_size
from gradest.errors import GradestError
from gradest.estimators import Estimator
from gradest.estimators.base import NonFiniteLogits
from gradest.io import atomic_write_bytes, atomic_write_text, run_metadata, write_json
from gradest.progress import Pace
from gradest.tasks import LanguageModelling, Translation


# ---------------------------------------------------------------------------------------------------- training
def start_distributed(config: TrainConfig) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA, each local rank
    on its own GPU, gloo on the CPU. A plain process is rank 0 of 1."""
    world = world_size()
    if world == 1:
        return 0, 1
    if config.batch_size % world:
        raise GradestError(f"batch_size={config.batch_size} does not split over {world} processes; valid: a "
                           f"multiple of {world}")
    cuda = torch.device(config.device).type == "cuda"
    if cuda:
        config.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(config.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after step `step`, its checkpoint and metrics written. A
    KeyboardInterrupt, not an Exception: whatever stops on Ctrl-C stops on it too, and code that records an
    Exception as a failed run (the study runner) leaves the run unfinished instead, to be resumed."""

    def __init__(self, step: int, signum: int):
        super().__init__(step, signum)
        self.step, self.signum = step, signum


class Diverged(GradestError):
    """The loss, the gradients or the parameters became NaN or inf; the last checkpoint written (all finite) stays."""


@contextlib.contextmanager
def stop_signals(enabled: bool = True, at_once=None):
    """While training: SIGINT and SIGTERM set a flag (the list this yields gets the signal's number) that the loop
    checks between steps, so a stop never leaves a step half done and always leaves a checkpoint. A second signal
    stops at once (KeyboardInterrupt; the atomic writes keep the last checkpoint whole). The previous handlers are
    restored afterwards. Only the main thread may set handlers (elsewhere nothing changes), and a signal ignored
    (SIG_IGN: nohup) stays ignored. Not `enabled`: nothing changes (the list stays empty).

    `at_once(signum)`, if given, is called the moment a signal arrives, from a thread of its own: a Python handler
    runs only when the main thread is back in Python, and a large model's first step is minutes inside torch. It
    may end the process there (os._exit), e.g. while no step has finished, when finishing one would keep nothing
    the checkpoint on disk does not hold; returning leaves the signal to the loop."""
    # inside another stop_signals (`gradest run` holds one from before it locks the run's directory), share its
    # list: a signal that came before these handlers were set is still seen
    outer = getattr(signal.getsignal(signal.SIGTERM), "received", None)
    received = outer if enabled and outer is not None else []

    def handle(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    handle.received = received
    previous = {}
    watcher = None
    if enabled and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handle)
        if at_once is not None and previous:
            watcher = SignalWatcher(at_once)
    try:
        yield received
    finally:
        if watcher is not None:
            watcher.stop()
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


class SignalWatcher:
    """Calls `callback(signum)` from a thread as soon as a signal with a Python handler arrives: the C-level handler
    writes its number to the wakeup fd at once, whatever the main thread is doing (torch releases the GIL)."""

    STOP = 255  # no signal has this number

    def __init__(self, callback):
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.previous = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self.watch, args=(callback,), daemon=True)
        self.thread.start()

    def watch(self, callback):
        while True:
            data = os.read(self.read, 1)
            if not data or data[0] == self.STOP:
                return
            callback(data[0])

    def stop(self):
        signal.set_wakeup_fd(self.previous)
        os.write(self.write, bytes([self.STOP]))
        self.thread.join()
        os.close(self.read)
        os.close(self.write)


RUN_FILES = ("checkpoint.pt", "metrics.csv", "config.json", "loss.png")  # what a run writes into its directory
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "data_generator", "rng", "step", "rows", "seconds", "config"}


def remove_stale_temporaries(out: Path):
    """Delete what killed writes left in a run directory: gradest.io writes `.NAME.<random>.tmp` next to NAME and
    renames it; a SIGKILL in between leaves it (a checkpoint's is as large as the model and optimiser). One process
    trains a run directory, so at its start every such file of the run's is stale."""
    for name in RUN_FILES:
        for path in Path(out).glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


def load_checkpoint(out) -> dict:
    """The checkpoint of the run in `out`. A file that is no checkpoint (empty, cut short, overwritten) is one line
    naming it and what to do, not torch's traceback."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        raise GradestError(f"no checkpoint in {out}/ (expected {path}: the directory of a `gradest run` of a Switch "
                           f"Transformer or Hugging Face model)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - torch.load raises many types (RuntimeError, UnpicklingError, EOFError, ..)
        state = None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        what = "empty" if path.stat().st_size == 0 else "truncated or not a gradest checkpoint"
        raise GradestError(f"{path} is not a readable checkpoint ({what}); delete the run directory {out}/ to start "
                           f"over, or resume another run")
    mismatch = checkpoint_mismatch(state)
    if mismatch:
        raise misfit(path, mismatch)
    return state


def misfit(path: Path, mismatch: str) -> GradestError:
    return GradestError(f"{path} does not fit this gradest ({mismatch}): it was written by another version or "
                        f"changed since; resume it with the gradest that wrote it, or start a new run")


def checkpoint_mismatch(state: dict) -> str | None:
    """What in a loaded checkpoint does not have the shape this gradest writes (None: nothing): its step, rows and
    record of settings (every setting a run always records present; unknown ones are named by TrainConfig)."""
    from gradest.config import MODEL_BY_NAME, RUN_SETTINGS
    step, config = state["step"], state["config"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        return f"its step is {step!r}; valid: an integer >= 0"
    if not isinstance(state["rows"], list):
        return f"its metrics are {type(state['rows']).__name__}, not a list of rows"
    if not isinstance(config, dict):
        return f"its settings are {type(config).__name__}, not a table"
    required = [*(name for name, setting in RUN_SETTINGS.items() if setting.stored == "always"), *MODEL_BY_NAME,
                "model"]
    missing = [name for name in required if name not in config]
    if missing:
        return f"setting {missing[0]} is missing from its record"
    if not isinstance(config["model"], dict):
        return f"its model settings are {config['model']!r}, not a table"
    return None


def config_of(settings: dict, path: Path) -> TrainConfig:
    """The TrainConfig of a checkpoint's settings; settings this gradest does not take are one line naming the
    checkpoint."""
    try:
        return TrainConfig(**settings)
    except GradestError as error:
        raise misfit(path, f"its settings: {error}") from None


def state_mismatch(error: Exception) -> str:
    """The first mismatch torch names when a state does not load into the model or optimiser built from the
    checkpoint's settings (`size mismatch for head.weight: ...`, `Missing key(s) in state_dict: ...`)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error).strip()]
    first = lines[0]
    return first if len(first) <= 160 else first[:160] + " ..."


class TrainableModel(Protocol):
    """What the Trainer asks of a model, beside an nn.Module's parameters and state (gradest.model's Switch
    Transformers, gradest.hf.train.HFCausalLM): its forward is called by the task (`Task.token_loss`)."""

    estimator: Estimator  # the routing rule it trains with
    per_layer_metrics: bool  # whether metrics.csv also has each MoE layer's routing

    def aux_loss(self) -> torch.Tensor:
        """The auxiliary losses (load balancing, z-loss) of the last forward, to add to the loss."""

    def routing_log_prob(self) -> torch.Tensor | None:
        """log P of the routing sampled in the last forward, per sequence (None: no score-function estimator)."""

    def zero_moe(self, zero: bool) -> None:
        """Make every MoE layer output 0 (REINFORCE's zero-output baseline) until called with False."""

    def update_expert_bias(self, total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """After each optimiser step: auxiliary-loss-free balancing's update of the selection biases from the last
        forward's loads, summed over ranks by `total` (nothing to do for a model without it)."""

    def routing_stats(self) -> list[dict]:
        """Each MoE layer's routing in the last forward: tokens_per_expert, argmax_fraction, router_entropy."""

    def num_parameters(self, active: bool = False) -> int:
        """Parameters, or those one token uses."""


@dataclass
class Trainer:
    """Holds everything a run needs; `state_dict` is exactly what decides the steps still to come. `estimator`:
    the one routing the model, if the caller built it; else the task's model builds it from `config`, once (a
    Hugging Face model's own routing fixes some of its defaults)."""

    config: TrainConfig
    out: Path
    estimator: Estimator | None = None

    def __post_init__(self):
        check_device(self.config.device)  # before anything is loaded: one line, not torch's traceback
        self.rank, self.world = start_distributed(self.config)
        torch.manual_seed(self.config.seed)
        if self.config.is_hf:
            from gradest.hf.train import HFLanguageModelling as task  # on use: gradest.hf needs the `hf` extra
        else:
            task = LanguageModelling if self.config.task == "lm" else Translation
        self.task = task(self.config)
        self.model: TrainableModel = self.task.model(self.estimator).to(self.config.device)
        self.estimator = self.model.estimator
        # the model the loss runs through: DDP averages gradients over ranks in backward
        self.forward_model = DistributedDataParallel(self.model) if self.world > 1 else self.model
        torch.manual_seed(self.config.seed + self.rank)  # each rank its own routing noise
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr,
                                           betas=(0.9, self.config.adam_beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.data_generator = torch.Generator().manual_seed(self.config.seed)
        self.step, self.rows, self.seconds = 0, [], 0.0
        self.saved_step = None  # the step of the checkpoint on disk (None: none written yet)
        self.resumed_from = None  # the step this process resumed the run at (None: it started the run)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio at step schedule_steps (default: the last step), held
        there after it (see TrainConfig)."""
        c = self.config
        if step < c.warmup:
            return (step + 1) / c.warmup
        if c.schedule == "inverse-sqrt":
            return math.sqrt(max(c.warmup, 1) / (step + 1))
        progress = min(1.0, (step - c.warmup) / max(1, (c.schedule_steps or c.steps) - c.warmup))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def autocast(self):
        device = torch.device(self.config.device).type
        return torch.autocast(device, dtype=DTYPES[self.config.dtype], enabled=self.config.dtype != "float32")

    def loss(self, batch, forward_model=None) -> tuple[torch.Tensor, dict]:
        """The loss to back-propagate: mean cross-entropy + auxiliary losses (+ the score-function surrogate)."""
        forward_model = forward_model or self.forward_model
        with self.autocast():
            token_loss, counted = self.task.token_loss(forward_model, batch, self.config.label_smoothing)
        tokens = counted.sum(-1).clamp_min(1)
        sequence_loss = token_loss.sum(-1) / tokens  # f of each sequence
        aux = self.model.aux_loss()
        log_prob = self.model.routing_log_prob()
        if log_prob is None:
            objective = sequence_loss.mean()
        else:  # REINFORCE: f is each sequence's loss, log P sums over its tokens and the MoE layers
            f_zero = None
            if self.estimator.needs_zero_output:
                with torch.no_grad(), self.autocast():
                    self.model.zero_moe(True)
                    zero_loss = self.task.token_loss(forward_model, batch)[0]
                    self.model.zero_moe(False)
                f_zero = zero_loss.sum(-1) / tokens
            objective = self.estimator.with_score(sequence_loss, log_prob.to(sequence_loss.dtype), f_zero).mean()
        return objective + aux, {"train_loss": sequence_loss.mean().item(), "aux_loss": aux.detach().item()}

    def routing_stats(self) -> dict:
        """Over the MoE layers: mean argmax fraction, router entropy, max load, each expert's share of the tokens;
        a Hugging Face model's also per patched block i: `layer{i}_max_load`, `layer{i}_router_entropy`,
        `layer{i}_argmax_fraction`."""
        layers = self.model.routing_stats()
        if not layers:
            return {}
        loads = [max(s["tokens_per_expert"]) * len(s["tokens_per_expert"]) / max(1, sum(s["tokens_per_expert"]))
                 for s in layers]
        shares = [sum(s["tokens_per_expert"][i] / max(1, sum(s["tokens_per_expert"])) for s in layers) / len(layers)
                  for i in range(self.config.model.experts)]
        per_layer = {f"layer{i}_{key}": value for i, (s, load) in enumerate(zip(layers, loads))
                     if self.model.per_layer_metrics
                     for key, value in (("max_load", load), ("router_entropy", s["router_entropy"]),
                                        ("argmax_fraction", s["argmax_fraction"]))}
        return {"argmax_fraction": sum(s["argmax_fraction"] for s in layers) / len(layers),
                "router_entropy": sum(s["router_entropy"] for s in layers) / len(layers),
                "max_load": sum(loads) / len(loads),  # tokens of the busiest expert over the mean, 1 = balanced
                **{f"load_{i}": share for i, share in enumerate(shares)},  # expert i's share of the tokens
                **per_layer}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss on a fixed set of batches (the same every time: its own generator)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(10_000 + self.config.seed)
        total = 0.0
        for _ in range(self.config.eval_batches):
            with self.autocast():
                token_loss, counted = self.task.token_loss(self.model, self.task.batch("val", generator))
            total += float(token_loss.sum() / counted.sum().clamp_min(1))
        self.model.train()
        return total / self.config.eval_batches

    def train_step(self) -> dict:
        """One optimiser step. A non-finite loss or gradient norm stops the run (Diverged) before the update, so
        the parameters stay those of the last good step."""
        start = time.perf_counter()
        self.model.train()
        batch = self.task.batch("train", self.data_generator)
        batch = tuple(t[self.rank::self.world] for t in batch)  # this rank's share of the global batch
        with self.divergence(self.step + 1):
            loss, row = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                    self.config.grad_clip or math.inf))
        # checked after backward: DDP averages the gradients, so every rank sees a non-finite norm and stops
        for name in ("train_loss", "grad_norm"):
            if not math.isfinite(row[name]):
                raise self.diverged(self.step + 1, f"{name.replace('_', ' ')} {row[name]}")
        self.optimizer.step()
        self.scheduler.step()
        self.model.update_expert_bias(self.sum_over_ranks if self.world > 1 else None)
        self.step += 1
        self.seconds += time.perf_counter() - start
        tokens = batch[-1].numel() * self.world
        row = self.mean_over_ranks({**row, **self.routing_stats()})
        return {"step": self.step, **row, "lr": self.scheduler.get_last_lr()[0], "seconds": self.seconds,
                "tokens_per_s": tokens / (time.perf_counter() - start)}

    def flops_per_update(self) -> int:
        """FLOPs of one training step's forward and backward passes (matrix products, as torch.utils.flop_counter
        counts them), on a training batch, over all ranks. It changes nothing the run depends on: the batch comes
        from its own generator, the RNG is restored and the parameters' gradients are left alone."""
        from torch.utils.flop_counter import FlopCounterMode
        batch = self.task.batch("train", torch.Generator().manual_seed(self.config.seed))
        batch = tuple(t[self.rank::self.world] for t in batch)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            loss = self.loss(batch, forward_model=self.model)[0]
            torch.autograd.grad(loss, parameters, allow_unused=True)
        return int(counter.get_total_flops()) * self.world

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the ranks (each rank's loads of its share of the batch)."""
        values = values.to(self.config.device)
        dist.all_reduce(values)
        return values

    def mean_over_ranks(self, values: dict) -> dict:
        """Each logged number averaged over the ranks (each saw its share of the batch)."""
        if self.world == 1:
            return values
        total = torch.tensor(list(values.values()), dtype=torch.float64, device=self.config.device)
        dist.all_reduce(total)
        return dict(zip(values, (total / self.world).tolist()))

    @contextlib.contextmanager
    def divergence(self, step: int):
        """On the CPU the router refuses NaN or inf logits before the loss can show them: parameters blown up by
        the last update reach it first. Report it as the divergence it is."""
        try:
            yield
        except NonFiniteLogits:
            raise self.diverged(step, "router logits NaN or inf") from None

    def diverged(self, step: int, what: str) -> Diverged:
        kept = (f"the last good checkpoint (step {self.saved_step}) was kept in {self.out}/"
                if self.saved_step is not None else
                f"no checkpoint had been written (the first is due at step {self.config.checkpoint_interval})")
        dtype = " or --dtype float32" if self.config.dtype != "float32" else ""
        return Diverged(f"training diverged at step {step} ({what}); {kept}; try a lower --lr, e.g. --lr "
                        f"{self.config.lr / 2:g} (half of {self.config.lr:g}){dtype}")

    def finite_parameters(self) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())

    def stop_signal(self, received: list) -> int:
        """The signal asking the run to stop (0: none). Under torchrun any rank's: all stop after the same step."""
        signum = received[0] if received else 0
        if self.world > 1:
            flag = torch.tensor([signum], device=self.config.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "data_generator": self.data_generator.get_state(),
                "rng": self.gather(torch.get_rng_state()), "step": self.step, "rows": self.rows, "seconds": self.seconds,
                "config": self.config.settings()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_generator.set_state(state["data_generator"])
        if isinstance(state["rng"], torch.Tensor):  # a single-process checkpoint from before data parallel
            state["rng"] = [state["rng"]]
        if len(state["rng"]) != self.world:
            raise GradestError(f"the checkpoint was written by {len(state['rng'])} processes; resume it with "
                               f"as many (this run has {self.world})")
        torch.set_rng_state(state["rng"][self.rank])
        self.step, self.rows, self.seconds = state["step"], state["rows"], state["seconds"]
        self.saved_step = self.step

    def gather(self, value) -> list:
        """`value` from every rank, in rank order (a list of one in a single process)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def save(self):
        """The checkpoint and metrics.csv of this step. Never a checkpoint with non-finite parameters: the run
        stops (Diverged) and the last one written stays."""
        if not self.finite_parameters():  # the same on every rank (DDP keeps the parameters equal)
            raise self.diverged(self.step, "parameters NaN or inf")
        state = self.state_dict()  # every rank takes part: it gathers their RNG states
        self.saved_step = self.step
        if self.rank != 0:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.out / "checkpoint.pt", buffer.getvalue())
        atomic_write_text(self.out / "metrics.csv", pd.DataFrame(self.rows).to_csv(index=False))

    @classmethod
    def resume(cls, out: Path, steps: int | None = None, device: str | None = None,
               state: dict | None = None) -> "Trainer":
        """The trainer of the checkpoint in `out` (`state`, if loaded already), ready to continue: on `device` if
        given, to `steps` if given. Other steps than the run's keep its learning-rate schedule (`schedule_steps`,
        see TrainConfig); they must be more than the steps done (nothing would run, and the run would end without
        its final evaluation)."""
        state = load_checkpoint(out) if state is None else state
        settings, done = dict(state["config"]), state["step"]  # flat settings
        if steps is not None and steps != settings["steps"]:
            if steps <= done:
                valid = f"--steps >= {done}" if done == settings["steps"] else f"--steps > {done}"
                raise GradestError(f"--steps {steps} would end the run in {out}/ at or before the {done} steps it "
                                   f"has done; valid: {valid}")
            settings["schedule_steps"] = settings.get("schedule_steps") or settings["steps"]
            settings["steps"] = steps
        if device is not None:
            settings["device"] = device
        path = Path(out) / "checkpoint.pt"
        trainer = cls(config_of(settings, path), Path(out))
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            if isinstance(error, GradestError):
                raise
            raise misfit(path, state_mismatch(error)) from None
        trainer.resumed_from = done
        return trainer

    def write_config(self, command: list[str] | None):
        """config.json: the run's settings (as they are now: a resume may change its steps, schedule_steps and
        device) and how it was started (command, git state, time). A resume keeps that record and appends itself
        to `resumes` (command, time, the step it resumed at), so the file never says the run was started by a
        command that did not start it."""
        path = self.out / "config.json"
        metadata = run_metadata({**self.config.settings(), "processes": self.world}, self.config.seed, command)
        if self.resumed_from is not None:
            resume = {key: metadata[key] for key in ("command", "timestamp", "git")} | {"step": self.resumed_from}
            try:
                previous = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # missing or unreadable: how the run started is unknown
                previous = {**metadata, "command": None, "timestamp": None}
            metadata = {**previous, "config": metadata["config"], "resumes": [*previous.get("resumes", []), resume]}
        write_json(path, metadata)

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, progress=None, command: list[str] | None = None, until: int | None = None, on_line=None,
            handle_signals: bool = False, stop_now=None) -> pd.DataFrame:
        """Train to config.steps (or stop after step `until`, as an interrupted run would, checkpoint saved).
        `on_line(line, row)` is called (on rank 0) with each `progress_line` and the row of its step.

        `handle_signals` (`gradest run`): SIGINT or SIGTERM stop the run after the step under way, its checkpoint
        and metrics written, by raising Interrupted. The caller's choice, because a process pool's worker (the study
        runner's) is ended by SIGTERM and must then die, not go on to its next queued task. `stop_now(signum)`: called
        (from another thread) on a signal that arrives before this process has finished a step, to end the process
        at once (see stop_signals)."""
        steps = range(self.step, min(self.config.steps, until or self.config.steps))
        if self.plateaued():  # a run stopped early is complete
            steps = range(0)
        first = self.step

        def at_once(signum):  # before the first step of this process ends: stop now, nothing to finish
            if self.step == first and self.world == 1 and signum in (signal.SIGINT, signal.SIGTERM):
                stop_now(signum)

        # (from before config.json is written: a signal while it is, git asked for its state, finds the handlers)
        with stop_signals(handle_signals, at_once=at_once if stop_now is not None else None) as received:
            if received and stop_now is not None:  # a signal came before these handlers (see stop_signals)
                at_once(received[0])
            if self.rank == 0:
                remove_stale_temporaries(self.out)
                self.write_config(command)
            bar = progress(steps) if progress and self.rank == 0 else steps
            pace = Pace(len(steps))
            for _ in bar:
                row = self.train_step()
                last = self.step == self.config.steps
                if self.step % self.config.eval_interval == 0 or last:
                    with self.divergence(self.step):
                        row["val_loss"] = self.evaluate()
                    row["val_ppl"] = math.exp(row["val_loss"]) if row["val_loss"] < 700 else math.inf
                    last = last or self.plateaued(row)
                if last:
                    row.update(self.task.final_metrics(self.model))
                self.rows.append(row)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                line = self.progress_line(row, pace, self.step - first)
                if line and on_line and self.rank == 0:
                    on_line(line, row)
                if self.step % self.config.checkpoint_interval == 0 or last or self.step == until:
                    self.save()
                signum = self.stop_signal(received) if handle_signals else 0
                if signum and not last:
                    if self.saved_step != self.step:
                        self.save()
                    raise Interrupted(self.step, signum)
                if last:
                    break
        return pd.DataFrame(self.rows)

    def plateaued(self, row: dict | None = None) -> bool:
        """Whether the run stops here by `plateau` (given the row of the step just evaluated, not yet in `rows`;
        else the last logged row): its validation loss is less than `plateau` below the one `plateau_window` steps
        earlier. Decided from the logged rows alone, so a resumed run stops where the uninterrupted one did."""
        if self.config.plateau is None:
            return False
        row = row if row is not None else self.rows[-1] if self.rows else None
        if row is None or "val_loss" not in row or not math.isfinite(row.get("val_loss", math.nan)):
            return False
        earlier = [r["val_loss"] for r in self.rows if r["step"] == row["step"] - self.config.plateau_window
                   and "val_loss" in r]
        return bool(earlier) and earlier[0] - row["val_loss"] < self.config.plateau

    @property
    def complete(self) -> bool:
        """All its steps trained, or stopped early by `plateau`."""
        return self.step >= self.config.steps or self.plateaued()

    def progress_line(self, row: dict, pace: Pace, done: int) -> str | None:
        """The line printed after a step (`gradest run`, and each cell of `gradest study run`), on stdout whatever
        stderr is, so that a captured log (no terminal, no progress bar) shows how a long run goes: one at every
        evaluation, and between them `pace`'s remarks on the `done` steps of this process (what the rest will take
        when it is long; a line when slow steps have printed nothing for a while)."""
        head = f"step {row['step']}/{self.config.steps}: train loss {row['train_loss']:.4f}"
        if "val_loss" in row:
            pace.shown()
            # tokens/s: the median over the steps since the last evaluation
            recent = pd.Series([r["tokens_per_s"] for r in self.rows[-self.config.eval_interval:]])
            return (f"{head}, val loss {row['val_loss']:.4f}, {recent.median():.0f} tokens/s, "
                    f"{time.perf_counter() - pace.start:.0f} s elapsed")
        remark = pace.remark(done)
        return f"{head}, {remark}" if remark else None

    def close(self):
        """Leave the process group (torchrun); nothing to do in a single process."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # no rank leaves while rank 0 still writes: a peer gone mid-teardown can abort gloo
            dist.destroy_process_group()
