"""``torchrun ... -m dgl_fast train --distributed``: DGL over a grid of ranks (DistributedDGL).

``--replicas R`` splits the world into R replica rows of ``WORLD_SIZE / R`` stage groups (each
row's feeding rank loads only its share of every ``--batch-size`` batch; ``--sync-bn``:
SyncBatchNorm over the replicas, CUDA only);
``--timeout`` bounds every exchange and collective; ``--out`` receives a checkpoint set after
every epoch (``--out/checkpoint/``: sync mode one torch.distributed.checkpoint set any grid loads,
async per-rank files; a manifest) and, from rank 0 only, the
summary; ``--resume DIR`` continues from such a set. Every rank checks at start-up that all were
launched with the same arguments (the fields named on a mismatch are the options)."""

from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import sys
import threading
import time

import torch

from .cli_checks import check_resumed_optimizer, run_options

_AGREED = ("model", "aux", "mode", "stages", "block_size", "depth", "width", "hidden", "epochs", "batch_size", "lr",
           "momentum", "weight_decay", "lr_step", "lr_decay", "data", "in_size", "seed", "replicas", "timeout",
           "buffer_capacity", "policy", "max_reuse", "resume", "sync_bn")


def check_distributed_args(args) -> None:
    """Option checks that need no process group (ValueError names the option)."""
    if "RANK" not in os.environ:
        raise ValueError("--distributed expects to be launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR are unset)")
    if args.mode not in ("dgl", "async") or args.engine not in ("auto", "sequential") or args.amp:
        raise ValueError(f"--distributed trains --mode dgl or async without --engine or --amp, got --mode {args.mode}"
                         + (f" --engine {args.engine}" if args.engine not in ("auto", "sequential") else "")
                         + (f" --amp {args.amp}" if args.amp else ""))
    if not 1 <= args.timeout <= 1e7:
        raise ValueError(f"argument --timeout: expected seconds from 1 to 1e7, got {args.timeout:g}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size // args.replicas < 2:  # every network of dgl_fast.models has BatchNorm
        raise ValueError(f"argument --batch-size: --batch-size {args.batch_size} split over --replicas {args.replicas} "
                         f"leaves a replica row {args.batch_size // args.replicas} sample(s), BatchNorm needs 2 a row: "
                         f"expected --batch-size >= {2 * args.replicas} (or fewer --replicas)")
    if world % args.replicas:
        raise ValueError(f"argument --replicas: must divide the {world} ranks (WORLD_SIZE), got {args.replicas}")
    if args.sync_bn and not args.device.startswith("cuda"):
        raise ValueError(f"argument --sync-bn: PyTorch's SyncBatchNorm needs CUDA devices, got --device {args.device}")
    if args.mode == "async" and args.replicas != 1:
        raise ValueError("argument --replicas: --mode async runs one replica row, got --replicas "
                         f"{args.replicas}")
    ignored = [flag for flag, on in (("--slowdown", bool(args.slowdown)), ("--schedule", args.schedule != "random"),
                                     ("--buffer-dtype", args.buffer_dtype not in (None, "float32")),
                                     ("--cuda-graphs", args.cuda_graphs), ("--channels-last", args.channels_last)) if on]
    if ignored:
        raise ValueError(f"argument {ignored[0]}: not used by --distributed runs (each rank runs its stages in turn; "
                         "async ranks are as fast as they are, not slowed down or drawn at random)")


def train_distributed(args, load_data, build_model, lr_schedule) -> int:
    import torch.distributed as dist  # noqa: PLC0415

    from .distributed import DistributedDGL  # noqa: PLC0415

    check_distributed_args(args)
    who = [f"rank {os.environ.get('RANK', 0)}"]  # this rank's name, once its stages are known
    _exit_4_on_torchrun_stop(who)  # before any thread starts (they inherit the blocked signal)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device.startswith("cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    # the runner's own waits (--timeout) fire first and name the peer; NCCL's watchdog is the backstop
    backstop = datetime.timedelta(seconds=1.5 * args.timeout + 30)
    if use_cuda:
        torch.cuda.set_device(device)
    attempt, join = _attempt(backstop)
    restarted = _restart(args, attempt)  # before the agreement: --resume may change
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=backstop, **join,
                            **({"device_id": device} if use_cuda else {}))
    try:
        rank = dist.get_rank()
        if restarted is not None and rank == 0:
            print(restarted[0], file=sys.stderr)
            _log(args.out, restarted[1])
        spec, model = _start(args, device, load_data, build_model)

        def optimizer(params):
            return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                   nesterov=args.nesterov)

        from .data import fingerprint  # noqa: PLC0415

        fields = {f"--{k.replace('_', '-')}": getattr(args, k) for k in _AGREED}
        # by content (samples, label sum, digest): ranks pointed at different data of one shape disagree
        fields["training data"] = (spec.name, len(spec.train), fingerprint(spec.train))
        fields["held-out data"] = (spec.name, fingerprint(spec.test))
        placement = "balance"
        if args.resume:  # the placement of the saved grid, if this is it (balancing again could choose another)
            placement = _saved_placement(args)
        ddgl = DistributedDGL(model, optimizer=optimizer, placement=placement, device=device, replicas=args.replicas,
                              mode=args.mode, sync_bn=args.sync_bn,
                              timeout=args.timeout, buffer_capacity=args.buffer_capacity, policy=args.policy,
                              max_reuse=args.max_reuse, fingerprint=fields)
        who[0] = ddgl.name
        if rank == 0 and ddgl.balance is not None:
            print(f"balanced placement: {ddgl.balance}", file=sys.stderr)
        print(f"{ddgl.name} on {device}", file=sys.stderr)
        if args.resume:
            ddgl.load(args.resume)
            check_resumed_optimizer(args, ddgl.trainer)
        ddgl.trainer.run_options = run_options(args)
        ckpt = os.path.join(args.out, "checkpoint") if args.out else None
        start = time.perf_counter()
        # a feeding rank loads only its replica row's share of each batch (its order from --seed)
        train, test = (spec.train.share_of(ddgl.replica, args.replicas), spec.test.share_of(ddgl.replica, args.replicas))
        records = ddgl.fit(train if ddgl.feeds else None, epochs=args.epochs, lr_schedule=lr_schedule(args),
                           checkpoint_dir=ckpt, progress=not args.no_progress,
                           callback=_report(args.out) if rank == 0 else None)
        acc = ddgl.evaluate(test if ddgl.feeds else None)
        state = ddgl.full_state_dict()
        if rank == 0:
            copy.deepcopy(model).load_state_dict(state)  # the gathered state is a whole model's
            summary = {"model": args.model, "stages": model.num_stages, "ranks": dist.get_world_size(),
                       "replicas": args.replicas, "mode": args.mode, "placement": ddgl.placement, "data": spec.name,
                       "epochs_done": ddgl.epoch, "train": ddgl.history, "this_run": len(records),
                       "test_acc_per_stage": acc, "test_acc": acc[-1], "train_time_s": time.perf_counter() - start,
                       "torch": torch.__version__}
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=1)
            print(f"held-out accuracy ({spec.name}, {dist.get_world_size()} ranks): {100 * acc[-1]:.2f}%  "
                  f"(per stage: {' '.join(f'{100 * a:.2f}' for a in acc)})")
    except BaseException:
        # sends or receives of a failed exchange may never complete: abort rather than wait for them
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch's own, no public name yet
        if abort is not None:
            abort()
        raise
    dist.destroy_process_group()
    return 0


def _start(args, device, load_data, build_model):
    """Every rank loads its data and builds the model, then all learn whether any failed: a rank
    whose start-up fails (its --data-dir missing, ...) is named by every rank within --timeout,
    and all exit 2, instead of the others waiting at the next rendezvous."""
    import torch.distributed as dist  # noqa: PLC0415

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.timeout))
    result, error = None, None
    try:
        torch.manual_seed(args.seed)  # the same initial weights on every rank (checked)
        spec = load_data(args, device)
        result = spec, build_model(args, spec)
    except (ValueError, FileNotFoundError) as exc:
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    errors = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(errors, error, group=group)
    except RuntimeError as exc:
        if error:
            raise ValueError(error) from None
        from .distributed.protocol import PeerError, describe_failure  # noqa: PLC0415

        raise PeerError(f"rank {dist.get_rank()}: the start-up check of every rank failed: "
                        f"{describe_failure(exc)}") from None
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise ValueError(f"rank {dist.get_rank()}: rank {r} failed its start-up{more}: {e}")
    return result


def _restart(args, attempt: int) -> tuple[str, dict] | None:
    """Under torchrun, an attempt after the first (``attempt`` > 1: its agents re-formed the group,
    after a failed rank under ``--max-restarts N`` or when a node re-joined) resumes from the last
    complete checkpoint in ``--out`` (else from ``--resume``, else from the start); returns the line
    to log and the ``metrics.jsonl`` record (None: a first attempt)."""
    if attempt < 2:
        return None
    from .distributed import files  # noqa: PLC0415

    ckpt = os.path.join(args.out, "checkpoint") if args.out else None
    epoch = None
    if ckpt is not None and os.path.exists(os.path.join(ckpt, files.MANIFEST)):
        with open(os.path.join(ckpt, files.MANIFEST)) as f:
            epoch = json.load(f).get("epoch")
        args.resume = ckpt
    source = (f"resuming from epoch {epoch} of {ckpt}" if epoch is not None else
              f"no complete checkpoint in --out: resuming from {args.resume}" if args.resume else
              "no complete checkpoint in --out: starting from the beginning")
    cause = "a rank of the previous attempt failed or stalled (torchrun's log names it)"
    failures = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    record = {"event": "restart", "restart": attempt - 1, "cause": cause, "resumed_from_epoch": epoch or 0,
              "restarts_counted_by_torchrun": failures}
    return f"restart {attempt - 1} (torchrun --max-restarts): {cause}; {source}", record


_GEN = "dgl_fast/attempt"


def _attempt(timeout) -> tuple[int, dict]:
    """This attempt's number (1, 2, ...; 1 outside torchrun) and the ``init_process_group``
    arguments that join it.

    torchrun's agents keep one store for every round of their rendezvous, and the ranks of a new
    round that joined through ``env://`` would read the addresses of the previous round's ranks
    and fail to connect (torch 2.14: a plain 15-line gloo script under ``torchrun --max-restarts 1``
    shows it). A round is not always a counted restart either: when a node's agent re-joins (a cut
    link, restored), the other nodes' agents restart their healthy ranks with the same
    ``TORCHELASTIC_RESTART_COUNT``. So each round gets its own number from the store: rank 0 takes
    the next one; every other rank waits for a number above the one its rank last joined, and joins
    the newest."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return 1, {}
    import torch.distributed as dist  # noqa: PLC0415

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    if rank == 0:
        attempt = store.add(_GEN, 1)
        store.set(f"{_GEN}/{attempt}", "open")
    else:
        seen = f"{_GEN}/rank-{rank}"
        last = int(store.get(seen)) if store.check([seen]) else 0
        try:
            store.wait([f"{_GEN}/{last + 1}"], timeout)
        except dist.DistStoreError as exc:
            raise RuntimeError(f"rank {rank}: rank 0 did not open attempt {last + 1} within "
                               f"{timeout.total_seconds():.0f} s") from exc
        attempt = store.add(_GEN, 0)
        store.set(seen, str(attempt))
    return attempt, {"store": dist.PrefixStore(f"{_GEN}-{attempt}", store), "rank": rank, "world_size": world}


def _log(out: str | None, record: dict) -> None:
    """A line of ``metrics.jsonl`` in ``out`` (nothing without ``--out``)."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def _report(out: str | None):
    """Rank 0's epoch callback: one line on stderr and, with ``--out``, a line of metrics.jsonl."""
    def report(rec: dict) -> None:
        accs = " ".join("-" if a is None else f"{100 * a:.1f}" for a in rec["train_acc"])
        print(f"epoch {rec['epoch']}: train accuracy per stage {accs} %, {rec['time_s']:.1f} s", file=sys.stderr)
        _log(out, rec)
    return report


def _saved_placement(args) -> list[int] | str:
    """The placement of the checkpoint set ``--resume`` names, after checking its grid is this
    launch's; a synchronous (DCP) set resumes on any grid: its placement on the same one, else
    ``"balance"``."""
    from .checkpoint import CheckpointError  # noqa: PLC0415
    from .distributed import files, resharding  # noqa: PLC0415

    if resharding.is_dcp(args.resume):
        try:
            _, meta = resharding.verify(args.resume, args.mode)
        except (OSError, CheckpointError, ValueError) as exc:
            raise ValueError(f"argument --resume: {exc}") from None
        saved = meta["saved_on"]
        same = saved["world_size"] == int(os.environ.get("WORLD_SIZE", 1)) and saved["replicas"] == args.replicas
        return list(saved["placement"]) if same else "balance"
    try:
        manifest = files.read_manifest(args.resume)
        files.check_grid(manifest, args.resume, int(os.environ.get("WORLD_SIZE", 1)), args.replicas)
    except (OSError, CheckpointError, ValueError) as exc:
        raise ValueError(f"argument --resume: {exc}") from None
    return list(manifest["placement"])


def _exit_4_on_torchrun_stop(who: list[str]) -> None:
    """Under torchrun: when a rank fails, its agent stops the others with SIGTERM, which Python would
    only see after the C++ wait it is in (then torchrun's SIGKILL, 30 s later). SIGTERM is blocked
    in every thread and a watcher thread takes it: one line naming this rank (``who[0]``) and the
    cause, and exit status 4, as for a peer lost within ``--timeout``. The last complete checkpoint
    set stays as it is (a set is written all or nothing)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch():
        signal.sigwait({signal.SIGTERM})
        sys.stderr.write(f"error: {who[0]}: stopped by torchrun (SIGTERM): another rank of this attempt failed; "
                         "torchrun restarts the run from the last checkpoint while --max-restarts allows\n")
        sys.stderr.flush()
        os._exit(4)

    threading.Thread(target=watch, name="dgl_fast-torchrun-stop", daemon=True).start()
