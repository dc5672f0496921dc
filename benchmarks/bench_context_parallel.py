#!/usr/bin/env python3
"""Context-parallel attention patterns on 1 GPU against N GPUs (default 2), float16, no TensorRT:
each strategy's communication runs through mdtrt's collectives (``prepare_collective`` on
preallocated buffers) and its attention through torch on device-resident data. Per sequence
length: latency (CUDA events on every GPU, median, the slowest GPU counts), speedup over one GPU,
peak memory per GPU, the K/V bytes a rank holds, the collectives alone and their share; every
strategy's output is checked against the one-GPU output.

Attention kernels: one GPU, allgather_kv and ulysses call ``scaled_dot_product_attention``, which
picks cuDNN's kernel on H200. Measured on one H200 (torch 2.11, cuDNN 9.19, float16, 56320 x 32
heads x 128, non-causal): 86.7 ms contiguous, 87.8 ms on the sequence-first strided views used
here; 16 heads 44.0 / 44.3 ms, so attention alone scales 1.98x over 2 GPUs and the rest of the
gap is communication, copies and host round trips that are not overlapped. Forcing flash takes
150 ms, memory-efficient 289 ms. Ring needs the log-sum-exp, so it calls the kernels directly:
cuDNN's (10.9 ms for a ring block of 28160 queries x 14080 keys x 32 heads), else flash (19.7 ms,
what ring used before, hence its 0.90x), else memory-efficient, else torch's CPU kernel (for the
CPU tests), each on the strided views, else on contiguous copies; ``lse_kernels`` in the results
says which ran.

Layouts are sequence-first, ``(sequence, batch, heads, head_dim)`` as in the sample's model, so a
gathered or all_to_all-ed buffer is already the attention's K/V (a strided view, no copy):

- allgather_kv: all_gather of each rank's packed K/V chunk, then attention over the whole
  sequence for the rank's queries; gathered in ``--kv-head-groups`` pieces of heads, each piece's
  attention (second stream) overlapping the next piece's gather.
- ulysses: all_to_all of packed Q/K/V from sequence to head shards (the send buffer is laid out
  group-major, then heads-chunk-major, as the projection that writes it can do for free),
  attention over the whole sequence for ``H/N`` heads, all_to_all back: of the attention's own
  output when it comes sequence-first (cuDNN's does: no copy; through the one-shot
  ``group.all_to_all``, which keeps one prepared call for its signature), else of a copy of it
  in the send layout. With ``--ulysses-head-groups G`` (default 1) each GPU's heads go in G
  groups, pipelined: group g attends on a second stream while group g+1 travels to its heads and
  group g-1 travels back (each exchange back waits, through an event, for its own group's
  attention only), so only the first exchange to heads and the last one back are exposed; unequal
  groups (``--ulysses-head-groups 2,12,2``) make those two small. One group is the plain pattern,
  and the fastest measured (2x H200, 56320, 2026-11-30): 1.88-1.89x; 2 groups 1.82x (1.85x with
  ``MDTRT_STREAM_PRIORITY=high``), 4 groups 1.85x (1.86x). Attending the other GPUs' query rows
  first and sending them back while the own rows attend on a second stream (tried, not kept)
  measured 1.84-1.85x: any split of the attention costs it more than the exchange it hides, and
  the attention alone scales only 1.92x from 32 to 16 heads (86.40 -> 44.95 ms on one H200).
- ring: as mdtrt's ONNX ring: K/V blocks broadcast from each root in turn (``--ring-blocks``
  blocks per rank's chunk, roots interleaved, double-buffered), each folded into a float32 online
  softmax with the log-sum-exp the attention kernel returns; the broadcasts overlap the attention
  of earlier blocks (which runs on a second stream). The rank's own chunk is attended while the
  first blocks travel. K/V held: the own chunk plus three blocks, never the whole K and V. The
  merge (fold) of each result runs on a third stream, overlapping the next block's attention; it
  keeps every partial result normalized, so it needs no pass for the first block and two
  full-size float32 passes for each later one, and writes the float16 output straight from the
  float32 sums (inside the timed pass; only the last merge is exposed).

    python benchmarks/bench_context_parallel.py --out results/context_parallel.json
    python benchmarks/bench_context_parallel.py --smoke          # tiny sizes: does it run?
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

STRATEGIES = ("allgather_kv", "ulysses", "ring")
DEFAULT_SEQUENCES = (8192, 16384, 32768, 56320, 131072)
QUICK_SEQUENCES = (8192, 56320)
SMOKE_SEQUENCES = (256, 512)
# The sample's float16 tolerance (mdtrt.attention.TOLERANCES), as max|x - ref| <= atol + rtol * max|ref|.
ATOL, RTOL = 1e-2, 1e-2
# Ulysses pipelines its exchanges over this many groups of each GPU's heads unless told otherwise.
# One group: on 2x H200 at 56320 (2026-11-30, 8 iterations each) 1 group reached 1.87x, 2 groups
# 1.84x, 4 groups 1.81x, groups of 2,12,2 heads 1.85x: the exchanges do not overlap the attention
# (it occupies every SM; NCCL's kernels wait for them), so pipelining only adds steps.
DEFAULT_ULYSSES_HEAD_GROUPS = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(p, out_default="results/context_parallel.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 3 iterations: checks that everything runs")
    p.add_argument("--sequences", type=bl.positive_int_list, default=None,
                   help=f"sequence lengths, comma-separated (default {','.join(map(str, DEFAULT_SEQUENCES))}; "
                        "a length whose buffers do not fit is reported as skipped)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"default {','.join(STRATEGIES)}")
    p.add_argument("--heads", type=bl.positive_int, default=32, help="attention heads (default 32)")
    p.add_argument("--head-dim", type=bl.positive_int, default=128, help="elements per head (default 128)")
    p.add_argument("--batch", type=bl.positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--iterations", type=bl.positive_int, default=None, help="timed iterations (default 20, quick 8, smoke 3)")
    p.add_argument("--ring-blocks", type=bl.positive_int, default=2,
                   help="blocks per rank's K/V chunk in the ring (more: less K/V memory, more merge steps; default 2)")
    p.add_argument("--kv-head-groups", type=bl.positive_int, default=1,
                   help="allgather_kv gathers K/V in this many pieces of heads, attending to each piece while the "
                        "next travels (default 1: one gather, then attention; 4 pieces measured 1.83x against 1.82x at "
                        "56320 and 0.94x against 1.17x at 8192 on 2x H200, 2026-11-30)")
    p.add_argument("--ulysses-head-groups", type=bl.positive_int_list, default=None,
                   help="ulysses exchanges each GPU's heads in groups, pipelined: one group attends while the next "
                        "travels to its heads and the one before travels back; only the first group's exchange to "
                        "heads and the last one's back are exposed. G: G equal groups (must divide the heads per "
                        "GPU); a,b,...: groups of a, b, ... heads adding up to the heads per GPU (e.g. 2,12,2: small "
                        "exposed exchanges). Default 1: one exchange each way around the attention (pipelining "
                        "measured slower on 2x H200: the attention occupies every SM, so the exchanges do not overlap it)")
    p.add_argument("--timeout", type=bl.positive_float, default=None, help="seconds for the whole run (default 240)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.gpu_list = bl.parse_gpus(args.gpus)
    if len(args.gpu_list) < 2:
        raise SystemExit(f"--gpus needs at least 2 GPU ids, got {args.gpus!r}")
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategy_list if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    text = args.sequences
    args.sequence_list = ([int(x) for x in text.split(",") if x.strip()] if text else
                          list(SMOKE_SEQUENCES if args.smoke else QUICK_SEQUENCES if args.quick else DEFAULT_SEQUENCES))
    n = len(args.gpu_list)
    for s in args.sequence_list:
        if s < 1 or s % (n * args.ring_blocks):
            raise SystemExit(f"sequence {s} must be a positive multiple of GPUs x --ring-blocks = {n * args.ring_blocks}")
    if args.smoke and args.heads == 32 and args.head_dim == 128:
        args.heads, args.head_dim = n * max(1, 4 // n), 64  # 4 heads, or one per GPU beyond 4 GPUs
    if args.heads % n:
        raise SystemExit(f"ulysses splits the heads over the GPUs: --heads {args.heads} is not divisible by {n}")
    args.ulysses_group_heads = ulysses_group_heads(args.ulysses_head_groups, args.heads, n)
    if args.kv_head_groups < 1 or args.heads % args.kv_head_groups:
        raise SystemExit(f"--kv-head-groups {args.kv_head_groups} must divide --heads {args.heads}")
    args.iteration_count = args.iterations or (3 if args.smoke else 8 if args.quick else 20)
    return args


def ulysses_group_heads(text: str | None, heads: int, gpus: int) -> list[int]:
    """Heads per ulysses group on each GPU from --ulysses-head-groups (None: the default)."""
    per_gpu = heads // gpus
    if text is None:
        count = DEFAULT_ULYSSES_HEAD_GROUPS if per_gpu % DEFAULT_ULYSSES_HEAD_GROUPS == 0 else 1
        return [per_gpu // count] * count
    values = [int(x) for x in text.split(",") if x.strip()]
    if len(values) == 1:
        if per_gpu % values[0]:
            raise SystemExit(f"--ulysses-head-groups {values[0]} must divide the heads per GPU: --heads {heads} "
                             f"over {gpus} GPUs is {per_gpu}")
        return [per_gpu // values[0]] * values[0]
    if sum(values) != per_gpu:
        raise SystemExit(f"--ulysses-head-groups {text}: group sizes add up to {sum(values)}, not to the heads per "
                         f"GPU: --heads {heads} over {gpus} GPUs is {per_gpu}")
    return values


def readiness(gpus: list[int]) -> str | None:
    """Why this benchmark cannot run here (a sentence), or None: torch and at least 2 GPUs."""
    return bl.readiness(gpus, torch_needed=True, minimum=2)


# -- the strategies -----------------------------------------------------------------------------

def device(gpu: int) -> str:
    """The torch device of a GPU id (the CPU test of the strategies' layouts replaces it)."""
    return f"cuda:{gpu}"


class Setup:
    """Random full Q, K, V on the first GPU, the one-GPU reference, and each rank's chunks."""

    def __init__(self, torch, gpus, sequence, batch, heads, head_dim, seed=0):
        self.torch, self.gpus, self.n = torch, gpus, len(gpus)
        self.s, self.b, self.h, self.d = sequence, batch, heads, head_dim
        g = torch.Generator(device=device(gpus[0])).manual_seed(seed)
        shape = (sequence, batch, heads, head_dim)
        self.full = [torch.randn(shape, generator=g, device=device(gpus[0]), dtype=torch.float16)
                     for _ in range(3)]
        self.chunk = sequence // self.n

    def heads_view(self, t):
        """(S, B, H, D) storage seen as the attention's (B, H, S, D), without a copy."""
        return t.permute(1, 2, 0, 3)

    def rank_rows(self, t, r):
        return t[r * self.chunk:(r + 1) * self.chunk]

    def free_full(self):
        self.full = None


def sdpa(torch, q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _cudnn_lse(torch, q, k, v):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    lse = out[1]
    return out[0], lse.squeeze(-1) if lse.dim() == 4 else lse  # (B, H, S, 1) in torch 2.11


def _flash_lse(torch, q, k, v):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
    return out[0], out[1]


def _efficient_lse(torch, q, k, v):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return out[0], out[1][..., :q.shape[2]]  # its log-sum-exp is padded to a multiple of 32


def _cpu_lse(torch, q, k, v):
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out[0], out[1]


# Attention kernels that return the log-sum-exp, fastest first. On one H200 (torch 2.11, cuDNN 9.19,
# float16, a ring block of 28160 queries x 14080 keys x 32 heads x 128): cuDNN 10.9 ms, flash
# 19.7 ms; memory-efficient took twice flash's time on the whole sequence. The CPU kernel lets the
# layouts be tested without GPUs.
LSE_KERNELS = (("cudnn", _cudnn_lse), ("flash", _flash_lse), ("efficient", _efficient_lse), ("cpu", _cpu_lse))
_lse_choice: dict = {}  # (device, dtype, shapes, strides) of q, k, v -> (kernel index, contiguous) that took them


def _layout_key(q, k, v):
    return tuple((str(t.device), t.dtype, tuple(t.shape), t.stride()) for t in (q, k, v))


def lse_kernel_names(layouts) -> list[str]:
    """The kernels attention_with_lse chose for these (q, k, v) triples, as "name (strided)" or
    "name (contiguous copies)"; layouts not attended yet are left out."""
    names = set()
    for q, k, v in layouts:
        choice = _lse_choice.get(_layout_key(q, k, v))
        if choice is not None:
            names.add(f"{LSE_KERNELS[choice[0]][0]} ({'contiguous copies' if choice[1] else 'strided'})")
    return sorted(names)


def attention_with_lse(torch, q, k, v):
    """Attention output (B, H, Sq, D) and its log-sum-exp (B, H, Sq) float32 through the first of
    LSE_KERNELS that takes the inputs: each is tried on the strided (B, H, S, D) views first, then
    on contiguous copies. The kernel and layout that worked are remembered per input layout, so the
    refusals are paid once. RuntimeError lists every kernel's refusal when none takes them;
    torch.cuda.OutOfMemoryError passes through (a slower kernel must not hide it)."""
    key = _layout_key(q, k, v)
    if key in _lse_choice:
        index, contiguous = _lse_choice[key]
        return LSE_KERNELS[index][1](torch, *(t.contiguous() if contiguous else t for t in (q, k, v)))
    errors, copies = [], None
    for index, (name, kernel) in enumerate(LSE_KERNELS):
        for contiguous in (False, True):
            if contiguous:
                if all(t.is_contiguous() for t in (q, k, v)):
                    continue
                copies = copies or tuple(t.contiguous() for t in (q, k, v))
            try:
                result = kernel(torch, *(copies if contiguous else (q, k, v)))
            except torch.cuda.OutOfMemoryError:
                raise  # a result (the sequence does not fit), not a refusal to fall back from
            except RuntimeError as error:  # NotImplementedError too: the kernel is absent for this device
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                errors.append(f"{name}{' (contiguous copies)' if contiguous else ''}: {first}")
                continue
            _lse_choice[key] = (index, contiguous)
            return result
    raise RuntimeError("no attention kernel returned the log-sum-exp for q, k, v of shapes "
                       f"{[tuple(t.shape) for t in (q, k, v)]} {q.dtype}: " + "; ".join(errors))


class Strategy:
    """One strategy on N GPUs: buffers made once; run() queues one forward pass without waiting
    for the GPUs (mdtrt's collectives on torch tensors are stream-ordered: each returns once queued,
    and the current stream of every GPU waits for it; attention kernels are queued behind or on
    streams that wait for it); comm() runs its collectives alone; outputs() gives each rank's
    result as (B, H, S/N, D)."""

    kv_tensors: list

    def __init__(self, torch, group, setup: Setup):
        self.torch, self.group, self.st = torch, group, setup

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_tensors) // self.st.n


class AllGatherKV(Strategy):
    """K/V gathered in ``head_groups`` pieces of heads: attention is independent per head, so the
    attention over the heads already gathered runs on a second stream while the next piece travels
    (the gather of a piece orders itself after the current stream only, which stays idle). Only
    the first piece's gather is exposed: 1/head_groups of the collective's time."""

    def __init__(self, torch, group, st, head_groups: int = 1):
        super().__init__(torch, group, st)
        self.head_groups = head_groups
        hg = st.h // head_groups
        self.q, self.kv_own, self.kv_all, self.streams = [], [], [], []
        for r, gpu in enumerate(st.gpus):
            q, k, v = (st.rank_rows(t, r).to(device(gpu)) for t in st.full)
            self.q.append(st.heads_view(q))
            kv = torch.stack([k, v], dim=1)  # (S/N, 2, B, H, D)
            # Per piece g: (S/N, 2, B, H/G, D), contiguous, as the projection writing it could lay it out.
            self.kv_own.append([kv[:, :, :, g * hg:(g + 1) * hg].contiguous() for g in range(head_groups)])
            self.kv_all.append([torch.empty((st.s, 2, st.b, hg, st.d), dtype=torch.float16, device=device(gpu))
                                for _ in range(head_groups)])
            self.streams.append(torch.cuda.Stream(device=device(gpu)))
        self.gathers = [group.prepare_collective("all_gather", [own[g] for own in self.kv_own],
                                                 out=[gathered[g] for gathered in self.kv_all])
                        for g in range(head_groups)]
        self.kv_tensors = [t for pieces in self.kv_own + self.kv_all for t in pieces]
        self.out = [None] * st.n

    def comm(self):
        for gather in self.gathers:
            gather()

    def run(self):
        torch, st = self.torch, self.st
        hg = st.h // self.head_groups
        for r, gpu in enumerate(st.gpus):
            self.streams[r].wait_stream(torch.cuda.current_stream(gpu))
        parts = [[] for _ in st.gpus]
        for g, gather in enumerate(self.gathers):
            gather()  # stream-ordered: the current streams wait for piece g; earlier pieces' attention runs on
            for r, gpu in enumerate(st.gpus):
                self.streams[r].wait_stream(torch.cuda.current_stream(gpu))
                with torch.cuda.device(gpu), torch.cuda.stream(self.streams[r]):
                    kv = self.kv_all[r][g]
                    parts[r].append(sdpa(torch, self.q[r][:, g * hg:(g + 1) * hg], st.heads_view(kv[:, 0]),
                                         st.heads_view(kv[:, 1])))
        for r, gpu in enumerate(st.gpus):
            torch.cuda.current_stream(gpu).wait_stream(self.streams[r])
            with torch.cuda.device(gpu):
                self.out[r] = torch.cat(parts[r], dim=1) if len(parts[r]) > 1 else parts[r][0]

    def outputs(self):
        return self.out


class Ulysses(Strategy):
    """Sequence shards to head shards and back by all_to_all, in groups of each rank's H/N heads
    (``group_heads``: heads per group), pipelined: while group g attends (on a second stream),
    group g+1's Q/K/V travel to their heads and group g-1's output travels back, so only the first
    group's exchange to heads and the last group's exchange back are exposed (small first and last
    groups keep those short). Each group has its own buffers, laid out so that each exchange is one
    contiguous all_to_all per direction. One group: attention on the current stream between the
    two exchanges, no second stream."""

    def __init__(self, torch, group, st, group_heads: list[int]):
        super().__init__(torch, group, st)
        n, hn = st.n, st.h // st.n
        if sum(group_heads) != hn:
            raise ValueError(f"ulysses head groups {group_heads} must add up to the {hn} heads per GPU")
        self.group_heads, self.head_groups = list(group_heads), len(group_heads)
        starts = [sum(group_heads[:g]) for g in range(len(group_heads))]
        # Per group g, per rank: send (N, S/N, 3, B, hg, D), slot j (heads j*H/N + start_g ...) for
        # rank j, as the projection that writes Q/K/V can lay them out for free; recv, slot i = rank
        # i's rows = sequence block i; back (N, S/N, B, hg, D) = (S, B, hg, D), slot j = sequence
        # block j for rank j; result, slot i = heads chunk i's group g for this rank's rows.
        self.send, self.recv, self.back, self.result = ([[] for _ in group_heads] for _ in range(4))
        self.streams = []
        for r, gpu in enumerate(st.gpus):
            q, k, v = (st.rank_rows(t, r).to(device(gpu)) for t in st.full)
            packed = torch.stack([q, k, v], dim=1).view(st.chunk, 3, st.b, n, hn, st.d)  # (S/N, 3, B, H, D)
            for g, (start, hg) in enumerate(zip(starts, group_heads)):
                send = packed[..., start:start + hg, :].permute(3, 0, 1, 2, 4, 5).contiguous()
                self.send[g].append(send)
                self.recv[g].append(torch.empty_like(send))
                self.back[g].append(torch.empty((n, st.chunk, st.b, hg, st.d), dtype=torch.float16,
                                                device=device(gpu)))
                self.result[g].append(torch.empty_like(self.back[g][-1]))
            self.streams.append(torch.cuda.Stream(device=device(gpu)) if len(group_heads) > 1 else None)
        self.to_heads = [group.prepare_collective("all_to_all", self.send[g], out=self.recv[g])
                         for g in range(self.head_groups)]
        self.to_sequence = [group.prepare_collective("all_to_all", self.back[g], out=self.result[g])
                            for g in range(self.head_groups)]
        self.kv_tensors = [t[:, :, 1:] for g in range(self.head_groups) for t in self.send[g] + self.recv[g]]

    def comm(self):
        for call in self.to_heads + self.to_sequence:
            call()

    def _attend(self, r, g, direct: bool = False):
        """Group g's attention on rank r over the whole sequence. Returns its output in the layout
        of back[g] (N, S/N, B, hg, D): with ``direct``, the attention's own output when it is laid
        out sequence-first (cuDNN keeps q's layout), else a copy into back[g]."""
        st, hg = self.st, self.group_heads[g]
        whole = self.recv[g][r].view(st.s, 3, st.b, hg, st.d)  # (S, 3, B, hg, D)
        out = sdpa(self.torch, *(st.heads_view(whole[:, i]) for i in range(3)))  # (B, hg, S, D)
        seq_first = out.permute(2, 0, 1, 3)  # (S, B, hg, D)
        if direct and seq_first.is_contiguous():
            return seq_first.view(self.back[g][r].shape)
        self.back[g][r].view(st.s, st.b, hg, st.d).copy_(seq_first)
        return self.back[g][r]

    def run(self):
        torch, st = self.torch, self.st
        if self.head_groups == 1:
            self.to_heads[0]()
            sends = []
            for r, gpu in enumerate(st.gpus):
                with torch.cuda.device(gpu):
                    sends.append(self._attend(r, 0, direct=True))
            if all(send is back for send, back in zip(sends, self.back[0])):
                self.to_sequence[0]()
            else:  # the attention outputs themselves (new tensors each pass): the one-shot call
                self.group.all_to_all(sends, out=self.result[0])
            return
        for r, gpu in enumerate(st.gpus):
            self.streams[r].wait_stream(torch.cuda.current_stream(gpu))
        attended = [None] * self.head_groups  # per group: each rank's event after its attention and copy
        self.to_heads[0]()  # exposed: nothing to attend yet
        for g in range(self.head_groups):
            # The exchange that fills recv[g] is ordered before the current streams' later work
            # (stream-ordered calls): the second stream waits for that point.
            attended[g] = []
            for r, gpu in enumerate(st.gpus):
                self.streams[r].wait_stream(torch.cuda.current_stream(gpu))
                with torch.cuda.device(gpu), torch.cuda.stream(self.streams[r]):
                    self._attend(r, g)
                    event = torch.cuda.Event()
                    event.record(self.streams[r])
                    attended[g].append(event)
            if g + 1 < self.head_groups:
                self.to_heads[g + 1]()  # while group g attends
            if g > 0:
                self._back(g - 1, attended)  # while group g attends
        self._back(self.head_groups - 1, attended)  # exposed: nothing left to attend
        for r, gpu in enumerate(st.gpus):
            torch.cuda.current_stream(gpu).wait_stream(self.streams[r])

    def _back(self, g, attended):
        """Exchange group g's output back, once its attention and copy finished on every GPU: the
        collective orders itself after the current stream, which waits for that event only."""
        for r, gpu in enumerate(self.st.gpus):
            self.torch.cuda.current_stream(gpu).wait_event(attended[g][r])
        self.to_sequence[g]()

    def outputs(self):
        st = self.st
        # result[g][r]: (N, S/N, B, hg, D), slot i = heads i*H/N + start_g ... -> (B, H, S/N, D)
        return [self.torch.cat([self.result[g][r].permute(2, 0, 3, 1, 4) for g in range(self.head_groups)], dim=2)
                .reshape(st.b, st.h, st.chunk, st.d) for r in range(st.n)]


class Ring(Strategy):
    """Blocks of every rank's K/V chunk broadcast in turn, roots interleaved block by block
    ((root 0, block 0), (root 1, block 0), ..., (root 0, block 1), ...), so that every rank gets
    work early. Each rank receives into two alternating buffers (the attention of the block before
    reads the other one), the root into a third one (its own block needs no attention), so a
    broadcast only waits for the attention that read its buffer two blocks earlier."""

    def __init__(self, torch, group, st, blocks: int):
        super().__init__(torch, group, st)
        self.blocks = blocks
        rows = st.chunk // blocks
        self.q, self.kv_own, self.recv, self.streams = [], [], [], []
        for r, gpu in enumerate(st.gpus):
            q, k, v = (st.rank_rows(t, r).to(device(gpu)) for t in st.full)
            self.q.append(st.heads_view(q))
            self.kv_own.append(torch.stack([k, v], dim=1))  # (S/N, 2, B, H, D)
            # Slots 0 and 1 alternate for received blocks; slot 2 takes the root's own block.
            self.recv.append([torch.empty((rows, 2, st.b, st.h, st.d), dtype=torch.float16, device=device(gpu))
                              for _ in range(3)])
            self.streams.append(torch.cuda.Stream(device=device(gpu)))  # attention
        self.fold_streams = [torch.cuda.Stream(device=device(gpu)) for gpu in st.gpus]  # merging the results
        self.order = [(root, b) for b in range(blocks) for root in range(st.n)]
        received = [0] * st.n
        self.slots, self.calls = [], []
        for root, b in self.order:
            slots = []
            for r in range(st.n):
                if r == root:
                    slots.append(2)
                else:
                    slots.append(received[r] % 2)
                    received[r] += 1
            self.slots.append(slots)
            inputs = [own[b * rows:(b + 1) * rows] for own in self.kv_own]  # only the root's is read
            self.calls.append(group.prepare_collective("broadcast", inputs, root=root,  # a world rank
                                                       out=[bufs[slot] for bufs, slot in zip(self.recv, slots)]))
        self.kv_tensors = self.kv_own + [b for bufs in self.recv for b in bufs]
        self.folds = 1 + (st.n - 1) * blocks  # attention results each rank merges: its own chunk, others' blocks
        self.out = [torch.empty((st.b, st.h, st.chunk, st.d), dtype=torch.float16, device=device(gpu))
                    for gpu in st.gpus]
        self.part, self.lse, self.seen = [None] * st.n, [None] * st.n, [0] * st.n

    def comm(self):
        for call in self.calls:
            call()

    def _fold(self, r, k, v):
        """Attend rank r's queries to one K/V block (on the current stream, its attention stream)
        and merge the result into its output by log-sum-exp on its fold stream, which waits for
        that attention only: the merge, memory-bound, overlaps the next block's attention. Returns
        the event after the attention (the K/V buffer may be refilled once it passed).

        The merge sums in float32 and keeps every partial result normalized (weights
        exp(lse_i - lse_all) sum to one), so the full-size passes are few: the first result is kept
        as the kernel returned it (float16); the second makes the float32 sum in one pass from both
        (plus the temporary product); later ones rescale it and add in place (two passes); the last
        writes the float16 output straight from the float32 sums."""
        torch = self.torch
        out, lse = attention_with_lse(torch, self.q[r], k, v)
        attended = torch.cuda.Event()
        attended.record(self.streams[r])
        fold = self.fold_streams[r]
        with torch.cuda.stream(fold):
            fold.wait_event(attended)
            for t in (out, lse):  # made on the attention stream, read on this one: not reused before
                t.record_stream(fold)
            self.seen[r] += 1
            if self.seen[r] == 1:
                self.part[r], self.lse[r] = out, lse
                return attended
            new = torch.logaddexp(self.lse[r], lse)  # (B, H, S) float32: cheap
            keep = torch.exp(self.lse[r] - new).unsqueeze(-1)
            add = torch.exp(lse - new).unsqueeze(-1)
            self.lse[r] = new
            if self.seen[r] == self.folds:
                torch.addcmul(out * add, self.part[r], keep, out=self.out[r])  # float32 math, float16 result
                self.part[r] = self.lse[r] = None
            elif self.seen[r] == 2:
                self.part[r] = torch.addcmul(out * add, self.part[r], keep)  # float16 x float32 -> float32 sums
            else:
                self.part[r].mul_(keep).addcmul_(out, add)
        return attended

    def run(self):
        torch, st = self.torch, self.st
        done = [[None, None, None] for _ in st.gpus]
        self.seen = [0] * st.n
        for r, gpu in enumerate(st.gpus):
            for stream in (self.streams[r], self.fold_streams[r]):
                stream.wait_stream(torch.cuda.current_stream(gpu))
            with torch.cuda.device(gpu), torch.cuda.stream(self.streams[r]):
                kv = self.kv_own[r]
                self._fold(r, st.heads_view(kv[:, 0]), st.heads_view(kv[:, 1]))  # own chunk, while blocks travel
        for index, (root, _) in enumerate(self.order):
            for r, gpu in enumerate(st.gpus):
                event = done[r][self.slots[index][r]]
                if event is not None:  # the attention that read this buffer two blocks ago
                    torch.cuda.current_stream(gpu).wait_event(event)
            self.calls[index]()  # stream-ordered: the current streams wait for the block
            for r, gpu in enumerate(st.gpus):
                if r == root:
                    continue  # its own block, attended with the whole own chunk
                slot = self.slots[index][r]
                self.streams[r].wait_stream(torch.cuda.current_stream(gpu))
                with torch.cuda.device(gpu), torch.cuda.stream(self.streams[r]):
                    kv = self.recv[r][slot]
                    done[r][slot] = self._fold(r, st.heads_view(kv[:, 0]), st.heads_view(kv[:, 1]))
        for r, gpu in enumerate(st.gpus):
            for stream in (self.streams[r], self.fold_streams[r]):
                torch.cuda.current_stream(gpu).wait_stream(stream)

    def outputs(self):
        return self.out

    def kernels(self) -> list[str]:
        """The log-sum-exp kernels its attention used (the own chunk's and the blocks' layouts)."""
        st = self.st
        layouts = [(self.q[r], st.heads_view(kv[:, 0]), st.heads_view(kv[:, 1]))
                   for r in range(st.n) for kv in (self.kv_own[r], self.recv[r][0])]
        return lse_kernel_names(layouts)


def make_strategy(name, torch, group, st, args):
    if name == "allgather_kv":
        return AllGatherKV(torch, group, st, args.kv_head_groups)
    if name == "ulysses":
        return Ulysses(torch, group, st, args.ulysses_group_heads)
    return Ring(torch, group, st, args.ring_blocks)


# -- timing -------------------------------------------------------------------------------------

def peak_bytes(torch, gpus, baseline) -> list[int]:
    """Peak bytes torch allocated on each GPU since reset_peaks, above what was allocated then."""
    return [int(torch.cuda.max_memory_allocated(gpu)) - base for gpu, base in zip(gpus, baseline)]


def reset_peaks(torch, gpus) -> list[int]:
    for gpu in gpus:
        torch.cuda.synchronize(gpu)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(gpu)
    return [int(torch.cuda.memory_allocated(gpu)) for gpu in gpus]


def compare(torch, reference, outputs, st) -> dict:
    """Rank r's (B, H, S/N, D) against rows r of the one-GPU output."""
    worst, scale = 0.0, float(reference.abs().max())
    for r, out in enumerate(outputs):
        want = reference[:, :, r * st.chunk:(r + 1) * st.chunk]
        got = out.to(want.device)
        worst = max(worst, float((got.float() - want.float()).abs().max()))
    return {"max_abs_error": worst, "max_reference": scale, "passed": bool(worst <= ATOL + RTOL * scale)}


def measure_sequence(torch, mdtrt, group, args, sequence: int) -> dict:
    from mdtrt.cuda_timing import event_times_ms as time_ms

    gpus = args.gpu_list
    st = Setup(torch, gpus, sequence, args.batch, args.heads, args.head_dim)
    point = {"sequence": sequence, "strategies": {}}
    baseline = reset_peaks(torch, gpus[:1])  # the full Q, K, V already there are not counted
    q, k, v = (st.heads_view(t) for t in st.full)
    holder = {}

    def single():
        holder["out"] = sdpa(torch, q, k, v)

    times = time_ms(torch, gpus[:1], single, args.iteration_count)
    reference = holder["out"].clone()
    point["single"] = {"median_ms": statistics.median(times), "times_ms": times,
                       "peak_bytes": peak_bytes(torch, gpus[:1], baseline)[0]
                       + 3 * sequence * args.batch * args.heads * args.head_dim * 2,
                       "kv_bytes": 2 * sequence * args.batch * args.heads * args.head_dim * 2}
    for name in args.strategy_list:
        try:
            baseline = reset_peaks(torch, gpus)
            strategy = make_strategy(name, torch, group, st, args)
            total = time_ms(torch, gpus, strategy.run, args.iteration_count)
            check = compare(torch, reference, strategy.outputs(), st)
            peaks = peak_bytes(torch, gpus, baseline)
            comm = time_ms(torch, gpus, strategy.comm, args.iteration_count)
            median, comm_median = statistics.median(total), statistics.median(comm)
            point["strategies"][name] = {
                "median_ms": median, "times_ms": total, "speedup": point["single"]["median_ms"] / median,
                "comm_ms": comm_median, "comm_share": comm_median / median, "peak_bytes": peaks,
                "kv_bytes": strategy.kv_bytes(), **check}
            if hasattr(strategy, "kernels"):
                point["strategies"][name]["lse_kernels"] = strategy.kernels()
            del strategy
        except Exception as error:  # noqa: BLE001 - one strategy failing (e.g. out of memory) is a result
            point["strategies"][name] = {"error": f"{type(error).__name__}: {error}"}
        for gpu in gpus:
            torch.cuda.synchronize(gpu)
            torch.cuda.empty_cache()
    # The one-GPU time drifts by a few percent over minutes on one machine (86.4-88.6 ms at 56320
    # between runs, 2x H200): timed again after the strategies, both passes make its median, so
    # that every speedup is against one-GPU passes bracketing the strategies'.
    again = time_ms(torch, gpus[:1], single, args.iteration_count)
    single_point = point["single"]
    single_point["pass_medians_ms"] = [single_point["median_ms"], statistics.median(again)]
    single_point["times_ms"] = times + again
    single_point["median_ms"] = statistics.median(times + again)
    for result in point["strategies"].values():
        if "median_ms" in result:
            result["speedup"] = single_point["median_ms"] / result["median_ms"]
    del reference, q, k, v
    st.free_full()
    return point


def run(args) -> dict:
    import torch

    import mdtrt

    budget = bl.Deadline(args.timeout or 240)
    result = {"config": {"gpus": args.gpu_list, "heads": args.heads, "head_dim": args.head_dim, "batch": args.batch,
                         "dtype": "float16", "iterations": args.iteration_count, "ring_blocks": args.ring_blocks,
                         "kv_head_groups": args.kv_head_groups, "ulysses_group_heads": args.ulysses_group_heads,
                         "strategies": args.strategy_list, "tolerance": [ATOL, RTOL]},
              "method": "CUDA events on every GPU's current stream around each forward pass, median, slowest GPU; "
                        "collectives through DeviceGroup.prepare_collective on preallocated torch buffers; attention "
                        "through torch scaled_dot_product_attention (ring: the cuDNN kernel with log-sum-exp, else "
                        "flash, else memory-efficient; lse_kernels says which ran); ulysses exchanges in "
                        f"{len(args.ulysses_group_heads)} pipelined groups of "
                        f"{'+'.join(map(str, args.ulysses_group_heads))} heads per GPU",
              "points": [], "skipped": []}
    with mdtrt.DeviceGroup(gpus=args.gpu_list, timeout=120) as group:
        for sequence in args.sequence_list:
            if budget.passed():
                result["skipped"].append({"sequence": sequence, "reason": "the run's time budget was spent"})
                continue
            started = time.monotonic()
            try:
                point = measure_sequence(torch, mdtrt, group, args, sequence)
            except torch.cuda.OutOfMemoryError as error:
                result["skipped"].append({"sequence": sequence, "reason": f"out of memory: {error}"})
                torch.cuda.empty_cache()
                continue
            point["seconds"] = time.monotonic() - started
            result["points"].append(point)
            summary = ", ".join(f"{n} {p['speedup']:.2f}x" if "speedup" in p else f"{n} failed"
                                for n, p in point["strategies"].items())
            print(f"[context_parallel] sequence {sequence}: 1 GPU {point['single']['median_ms']:.2f} ms; {summary}",
                  flush=True)
            bl.write_json(args.out, result)  # partial results survive a timeout
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    blocker = readiness(args.gpu_list)
    if blocker:
        print(f"bench_context_parallel: cannot run: {blocker}", file=sys.stderr)
        return 2
    result = run(args)
    result["machine"] = bl.machine_info(args.gpu_list)
    bl.write_json(args.out, result)
    failed = [(p["sequence"], n) for p in result["points"] for n, s in p["strategies"].items()
              if not s.get("passed")]
    if failed:
        print(f"[context_parallel] failed or wrong against the one-GPU output: {failed}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
