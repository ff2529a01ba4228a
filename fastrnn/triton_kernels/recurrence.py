"""Persistent recurrence kernels: one launch runs a whole layer (every step, both directions).

Legend: B batch, T time, H hidden size, P = proj_size or H, G gates, D directions,
WS workspace gates (cells.py), s step index (0 .. T-1 in the order a direction runs),
t_row the time index of row b at step s (s forward; length_b - 1 - s reverse, or s where the row
is past its length, so that every (t, b) is written exactly once).

Tiling: grid (num_programs * groups, D). Program (j, group) of direction d owns the hidden units
j*BLOCK_H .. (j+1)*BLOCK_H (all G gates of them, so the cell update is local) and the output
columns j*BLOCK_R .. (j+1)*BLOCK_R of P, for the batch rows group*group_rows .. +group_rows,
in chunks of BLOCK_B. Batch groups never read each other's rows: each has its own barrier, and
each program reads only its group's rows of the exchanged state. The forward's gate matmul is
one tile over all gates of the own units ([P, GP*BLOCK_H], GP = G rounded up to a power of two,
_gate_columns), so that even a program owning 2 units runs an 8-column matmul.

Each step is split into phases separated by a grid barrier (per direction):
  forward:  [cell]            h_{t-1} [B, P] (all programs) -> cell on own units -> own h_t slice
            [cell, project]   with proj_size: cell -> own m_t = o*tanh(c) slice; then
                              m_t [B, H] (all programs) -> own slice of h_t = W_hr m_t
  backward: [cell, hidden]    grad of h_t -> cell backward on own units -> own slice of the
                              hidden-side pre-activation grads; then those [B, G*H] (all programs)
                              -> own slice of grad h_{t-1} = grad_hg @ W_hh (+ GRU z * grad_h)
The barrier is split-phase: a program arrives (atomic add) after a phase and, before the next
phase that reads other programs' results, waits until every program of its direction and batch
group has arrived.
Phase `ph` waits for num_programs * ph arrivals, so one launch may run any range of phases:
all of them (persistent; needs every program co-resident) or one (a launch per phase). A wait
that outlasts spin_limit polls marks the counter TIMED_OUT instead of hanging. A program that
sees the mark once its phases are done fills everything it owns with NaN (outputs, final states,
gradients), so the launch that timed out hands back no plausible numbers; the launcher raises
once it reads the counter (at a later launch, so that the normal path never waits for the GPU).

RESIDENT: each program loads its weight slices once, before the time loop, and keeps them on-chip
for every step, as NUM_K tiles of BLOCK_K rows of K (_resident_chunks), so that a matmul stages
its other operand one K chunk at a time; otherwise weights are streamed from global memory (L2)
in BLOCK_K chunks each phase. State exchanged between programs lives in small global buffers:
h in the layer's 16-bit dtype (float32 for float32 layers), gradients in float32.
"""

import triton
import triton.language as tl

CELL_LSTM = tl.constexpr(0)
CELL_GRU = tl.constexpr(1)
CELL_RNN_TANH = tl.constexpr(2)
CELL_RNN_RELU = tl.constexpr(3)

# Runtime sizes are not specialized on, so no batch size or sequence length compiles anew.
_RUNTIME_INTS = ["B", "T", "H", "P", "phase_begin", "phase_end", "num_programs", "group_rows",
                 "spin_limit"]
# Set in a direction's arrival counter by a program that waited longer than spin_limit polls:
# every later wait passes at once, and the launcher raises. Arrivals alone never reach it.
TIMED_OUT = tl.constexpr(1 << 30)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _wait_for_arrivals(counter_ptr, target, spin_limit):
    """Spin until the direction's arrival counter reaches `target`; after spin_limit polls,
    mark the counter TIMED_OUT (the programs are not all resident) and stop waiting."""
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
    polls = 0
    while arrived < target:
        polls += 1
        if polls > spin_limit:
            tl.atomic_or(counter_ptr, TIMED_OUT, sem="relaxed")
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _arrive(counter_ptr):
    """Publish this program's writes of the phase and count it as arrived."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _timed_out(counter_ptr):
    """Whether any program of this direction and batch group marked the counter TIMED_OUT.

    The counter is one word changed only by atomic read-modify-writes, so a program that passed
    a barrier the marking program had not reached sees the mark here."""
    return (tl.atomic_add(counter_ptr, 0, sem="acquire") & TIMED_OUT) != 0


@triton.jit
def _poison(ptr, row_begin, row_end, row_stride, columns, column_mask, BLOCK_B: tl.constexpr):
    """NaN into ptr[row * row_stride + column] for rows row_begin .. row_end and the columns."""
    nan = tl.full([BLOCK_B, columns.shape[0]], float("nan"), tl.float32)
    for b0 in range(row_begin, row_end, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        mask = (rows < row_end)[:, None] & column_mask[None, :]
        tl.store(ptr + rows.to(tl.int64)[:, None] * row_stride + columns[None, :],
                 nan.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_rows(lengths_ptr, b0, s, T, B, d, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """Rows b0 .. b0+BLOCK_B at step s of direction d: (rows, in range, has step s, t_row int64).

    (Scalars are broadcast before combining with row masks: the interpreter turns bool & scalar
    bool into integers.)
    """
    rows = b0 + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if HAS_LENGTHS:
        seq_len = tl.load(lengths_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    else:
        seq_len = tl.zeros([BLOCK_B], tl.int32) + T
    valid = row_mask & (s < seq_len)
    t_row = tl.where(valid & (rows * 0 + d == 1), seq_len - 1 - s, s).to(tl.int64)
    return rows, row_mask, valid, t_row


@triton.jit
def _dot(a, w, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc [M, N] += a [M, K] @ w [K, N]; in float32 when DOT_FP32, else in w's dtype."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a.to(w.dtype), w, acc)
    return acc


@triton.jit
def _load_rows(a_ptr, a_rows, extra_ptr, extra_rows, extra_valid, row_mask, k, K,
               HAS_EXTRA: tl.constexpr):
    """[BLOCK_B, BLOCK_K] float32: a[row, k] (+ extra[row, k] where extra_valid).

    a_rows, extra_rows: [BLOCK_B] element offsets of each row's column 0 (columns contiguous).
    """
    mask = row_mask[:, None] & (k < K)[None, :]
    a = tl.load(a_ptr + a_rows[:, None] + k[None, :], mask=mask, other=0.0,
                cache_modifier=".cg").to(tl.float32)
    if HAS_EXTRA:
        a += tl.load(extra_ptr + extra_rows[:, None] + k[None, :],
                     mask=mask & extra_valid[:, None], other=0.0).to(tl.float32)
    return a


@triton.jit
def _load_weight(w_ptr, k, K, n_offsets, n_mask, stride_k):
    """[len(k), len(n)] weight tile w[k * stride_k + n_offsets], 0 where k >= K or not n_mask.

    Kept in cache (evict_last): streamed plans read the same slice every step.
    """
    mask = (k < K)[:, None] & n_mask[None, :]
    return tl.load(w_ptr + k[:, None] * stride_k + n_offsets[None, :], mask=mask, other=0.0,
                   eviction_policy="evict_last")


@triton.jit
def _resident_chunks(w_ptr, K, n_offsets, n_mask, stride_k, BLOCK_K: tl.constexpr,
                     NUM_K: tl.constexpr):
    """The weight tile over all of K, kept on-chip as NUM_K tiles [BLOCK_K, len(n)] (a tuple), so
    that each matmul stages one K chunk of its other operand at a time."""
    chunks = ()
    for c in tl.static_range(NUM_K):
        chunks = chunks + (_load_weight(w_ptr, c * BLOCK_K + tl.arange(0, BLOCK_K), K, n_offsets,
                                        n_mask, stride_k),)
    return chunks


@triton.jit
def _resident_matmul(a_ptr, a_rows, row_mask, K, chunks, acc, BLOCK_K: tl.constexpr,
                     NUM_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc [BLOCK_B, N] += rows of a (see _load_rows, columns 0 .. K) @ the resident chunks."""
    for c in tl.static_range(NUM_K):
        a = _load_rows(a_ptr, a_rows, a_ptr, a_rows, row_mask, row_mask,
                       c * BLOCK_K + tl.arange(0, BLOCK_K), K, False)
        acc = _dot(a, chunks[c], acc, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def _gate_columns(j, H, P, G: tl.constexpr, GP: tl.constexpr, BLOCK_H: tl.constexpr):
    """The weight columns of program j's merged gate tile: column c is gate c // BLOCK_H of unit
    j * BLOCK_H + c % BLOCK_H (GP = G rounded up to a power of two; columns of gates >= G and
    units >= H are masked). Returns (offsets of row gate*H + unit in w_hh [G*H, P], mask)."""
    c = tl.arange(0, GP * BLOCK_H)
    gate = c // BLOCK_H
    unit = j * BLOCK_H + c % BLOCK_H
    return (gate * H + unit) * P, (gate < G) & (unit < H)


@triton.jit
def _split_gates(acc, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, GP: tl.constexpr):
    """[BLOCK_B, GP*BLOCK_H] (columns as in _gate_columns, GP 1 or 4) -> four [BLOCK_B, BLOCK_H]
    tiles, one per gate (all four are acc itself when GP == 1)."""
    tl.static_assert(GP == 1 or GP == 4)
    if GP == 1:
        return acc, acc, acc, acc
    else:
        # column (2a + b) * BLOCK_H + u -> [row, u, a, b]
        by_gate = tl.permute(tl.reshape(acc, [BLOCK_B, 2, 2, BLOCK_H]), (0, 3, 1, 2))
        even, odd = tl.split(by_gate)  # b = 0: gates 0, 2; b = 1: gates 1, 3
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
        return g0, g1, g2, g3


@triton.jit
def _streamed_matmul(a_ptr, a_rows, extra_ptr, extra_rows, extra_valid, row_mask, K,
                     w_ptr, stride_k, n_offsets, n_mask, HAS_EXTRA: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_N] float32: rows of a (see _load_rows) @ weight tile, K in BLOCK_K chunks.

    The weight element (k, n) is w_ptr[k * stride_k + n_offsets[n]] (0 where not n_mask[n]).
    """
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _load_rows(a_ptr, a_rows, extra_ptr, extra_rows, extra_valid, row_mask, k, K,
                       HAS_EXTRA)
        w = _load_weight(w_ptr, k, K, n_offsets, n_mask, stride_k)
        acc = _dot(a, w, acc, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def _gate_preactivation(x_ptr, x_rows, b_ptr, units, mask, acc, gate, H,
                        HAS_BIAS: tl.constexpr):
    """x-side gate `gate` [BLOCK_B, BLOCK_H] float32 and its hidden side W h (+ b) (acc)."""
    x = tl.load(x_ptr + x_rows[:, None] + gate * H + units[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + gate * H + units, mask=units < H, other=0.0).to(tl.float32)[None, :]
    return x, acc


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["stride_xt", "stride_xb"])
def _recurrence_fwd_kernel(
    x_ptr, stride_xt, stride_xb,  # x_gates [T, B, D*G*H], last dim contiguous
    h0_ptr,  # [D, B, P]
    w_hh_ptr,  # [D, G*H, P]
    b_hh_ptr,  # [D, G*H] (HAS_BIAS)
    w_hr_ptr,  # [D, P, H] (HAS_PROJ)
    lengths_ptr,  # [B] int64 (HAS_LENGTHS)
    output_ptr,  # [T, B, D*P]
    workspace_ptr,  # [T, B, D, WS*H]
    h_state_ptr,  # [2, D, B, P] float32, or the layer's 16-bit dtype (its dots round h to it
    #               anyway): h before step s in buffer s % 2 (h0 in buffer 0)
    m_state_ptr,  # [D, B, H] float32: o * tanh(c) of the step (HAS_PROJ)
    c_state_ptr,  # [D, B, H] float32: cell state (LSTM), c0 on entry, c_n on exit
    counter_ptr,  # [D, groups] int32 barrier arrivals
    B, T, H, P, phase_begin, phase_end, num_programs, group_rows, spin_limit,
    CELL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, WS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, BLOCK_KH: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Run phases phase_begin .. phase_end of the forward recurrence (see the module docstring).

    GP: G rounded up to a power of two: the gates of own units form one [P, GP*BLOCK_H] weight
    tile and one matmul (_gate_columns). BLOCK_K: K chunk over P of that matmul (NUM_K resident
    chunks cover P when RESIDENT); BLOCK_KH: K chunk over H of the projection (all of it when
    RESIDENT).
    """
    j = tl.program_id(0) % num_programs  # own units and columns
    group = tl.program_id(0) // num_programs  # own batch rows: group_rows of them
    batch_begin = group * group_rows
    batch_end = tl.minimum(batch_begin + group_rows, B)
    groups = tl.num_programs(0) // num_programs
    d = tl.program_id(1)
    D = tl.num_programs(1)
    counter_ptr += d * groups + group
    PHASES: tl.constexpr = 2 if HAS_PROJ else 1
    units = j * BLOCK_H + tl.arange(0, BLOCK_H)  # own hidden units
    cols = j * BLOCK_R + tl.arange(0, BLOCK_R)  # own output columns (projection phase)
    w_gates_ptr = w_hh_ptr + d * G * H * P
    w_proj_ptr = w_hr_ptr + d * P * H
    bias_ptr = b_hh_ptr + d * G * H
    gate_offsets, gate_mask = _gate_columns(j, H, P, G, GP, BLOCK_H)
    if RESIDENT:  # weight slices kept on-chip for the whole sequence
        w_gates = _resident_chunks(w_gates_ptr, P, gate_offsets, gate_mask, 1, BLOCK_K,
                                   NUM_K)  # [P, GP*BH] in NUM_K chunks
        if HAS_PROJ:
            k_hidden = tl.arange(0, BLOCK_KH)
            w_proj = _load_weight(w_proj_ptr, k_hidden, H, cols * H, cols < P, 1)  # [H, own cols]

    for ph in range(phase_begin, phase_end):
        s = ph // PHASES
        _wait_for_arrivals(counter_ptr, num_programs * ph, spin_limit)
        h_prev_ptr = h_state_ptr + ((s % 2) * D + d) * B * P
        h_next_ptr = h_state_ptr + (((s + 1) % 2) * D + d) * B * P
        if ph % PHASES == 0:  # cell phase: own units of every row
            for b0 in range(batch_begin, batch_end, BLOCK_B):
                rows, row_mask, valid, t_row = _step_rows(lengths_ptr, b0, s, T, B, d,
                                                          HAS_LENGTHS, BLOCK_B)
                mask = row_mask[:, None] & (units < H)[None, :]
                keep = valid[:, None]
                h_rows = rows * P
                if RESIDENT:
                    acc = _resident_matmul(h_prev_ptr, h_rows, row_mask, P, w_gates,
                                           tl.zeros([BLOCK_B, GP * BLOCK_H], tl.float32),
                                           BLOCK_K, NUM_K, DOT_FP32, INPUT_PRECISION)
                else:
                    acc = _streamed_matmul(h_prev_ptr, h_rows, h_prev_ptr, h_rows, valid,
                                           row_mask, P, w_gates_ptr, 1, gate_offsets, gate_mask,
                                           False, BLOCK_B, GP * BLOCK_H, BLOCK_K, DOT_FP32,
                                           INPUT_PRECISION)
                acc0, acc1, acc2, acc3 = _split_gates(acc, BLOCK_B, BLOCK_H, GP)
                x_rows = t_row * stride_xt + rows * stride_xb + d * G * H
                ws_rows = ((t_row * B + rows) * D + d) * (WS * H)
                out_ptrs = output_ptr + (t_row * B + rows)[:, None] * (D * P) + d * P + units[None, :]
                state_ptrs = (d * B + rows)[:, None] * H + units[None, :]
                if not HAS_PROJ:
                    h_own = tl.load(h_prev_ptr + h_rows[:, None] + units[None, :], mask=mask,
                                    other=0.0).to(tl.float32)
                x0, acc0 = _gate_preactivation(x_ptr, x_rows, bias_ptr, units, mask, acc0, 0, H,
                                               HAS_BIAS)
                if CELL == CELL_LSTM:
                    x1, acc1 = _gate_preactivation(x_ptr, x_rows, bias_ptr, units, mask, acc1, 1,
                                                   H, HAS_BIAS)
                    x2, acc2 = _gate_preactivation(x_ptr, x_rows, bias_ptr, units, mask, acc2, 2,
                                                   H, HAS_BIAS)
                    x3, acc3 = _gate_preactivation(x_ptr, x_rows, bias_ptr, units, mask, acc3, 3,
                                                   H, HAS_BIAS)
                    i = _sigmoid(x0 + acc0)
                    f = _sigmoid(x1 + acc1)
                    g = _tanh(x2 + acc2)
                    o = _sigmoid(x3 + acc3)
                    c_prev = tl.load(c_state_ptr + state_ptrs, mask=mask, other=0.0)
                    c = f * c_prev + i * g
                    h_new = o * _tanh(c)
                    tl.store(c_state_ptr + state_ptrs, tl.where(keep, c, c_prev), mask=mask)
                    saved = ws_rows[:, None] + units[None, :]
                    tl.store(workspace_ptr + saved, tl.where(keep, i, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + H, tl.where(keep, f, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + 2 * H, tl.where(keep, g, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + 3 * H, tl.where(keep, o, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + 4 * H, tl.where(keep, c, 0.0), mask=mask)
                elif CELL == CELL_GRU:
                    x1, acc1 = _gate_preactivation(x_ptr, x_rows, bias_ptr, units, mask, acc1, 1,
                                                   H, HAS_BIAS)
                    x2, acc2 = _gate_preactivation(x_ptr, x_rows, bias_ptr, units, mask, acc2, 2,
                                                   H, HAS_BIAS)
                    r = _sigmoid(x0 + acc0)
                    z = _sigmoid(x1 + acc1)
                    n = _tanh(x2 + r * acc2)
                    h_new = n + z * (h_own - n)
                    saved = ws_rows[:, None] + units[None, :]
                    tl.store(workspace_ptr + saved, tl.where(keep, r, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + H, tl.where(keep, z, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + 2 * H, tl.where(keep, n, 0.0), mask=mask)
                    tl.store(workspace_ptr + saved + 3 * H, tl.where(keep, acc2, 0.0), mask=mask)
                elif CELL == CELL_RNN_TANH:
                    h_new = _tanh(x0 + acc0)
                else:
                    h_new = tl.where(x0 + acc0 < 0.0, 0.0, x0 + acc0)  # NaN stays NaN
                if HAS_PROJ:
                    tl.store(m_state_ptr + state_ptrs, h_new, mask=mask)
                else:
                    tl.store(h_next_ptr + h_rows[:, None] + units[None, :],
                             tl.where(keep, h_new, h_own), mask=mask)
                    tl.store(out_ptrs, tl.where(keep, h_new, 0.0).to(output_ptr.dtype.element_ty),
                             mask=mask)
        if HAS_PROJ:  # compiled only with a projection
            if ph % 2 == 1:  # projection phase: own output columns h_t = W_hr m_t
                m_ptr = m_state_ptr + d * B * H
                for b0 in range(batch_begin, batch_end, BLOCK_B):
                    rows, row_mask, valid, t_row = _step_rows(lengths_ptr, b0, s, T, B, d,
                                                              HAS_LENGTHS, BLOCK_B)
                    mask = row_mask[:, None] & (cols < P)[None, :]
                    keep = valid[:, None]
                    m_rows = rows * H
                    if RESIDENT:
                        m = _load_rows(m_ptr, m_rows, m_ptr, m_rows, valid, row_mask, k_hidden, H,
                                       False)
                        h_new = _dot(m, w_proj, tl.zeros([BLOCK_B, BLOCK_R], tl.float32),
                                     DOT_FP32, INPUT_PRECISION)
                    else:
                        h_new = _streamed_matmul(m_ptr, m_rows, m_ptr, m_rows, valid, row_mask, H,
                                                 w_proj_ptr, 1, cols * H, cols < P, False, BLOCK_B,
                                                 BLOCK_R, BLOCK_KH, DOT_FP32, INPUT_PRECISION)
                    h_cols = (rows * P)[:, None] + cols[None, :]
                    h_own = tl.load(h_prev_ptr + h_cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(h_next_ptr + h_cols, tl.where(keep, h_new, h_own), mask=mask)
                    out_ptrs = output_ptr + (t_row * B + rows)[:, None] * (D * P) + d * P + cols[None, :]
                    tl.store(out_ptrs, tl.where(keep, h_new, 0.0).to(output_ptr.dtype.element_ty),
                             mask=mask)
        _arrive(counter_ptr)

    if _timed_out(counter_ptr):  # own output columns, h of both buffers, own c: NaN
        if HAS_PROJ:
            own, own_mask = cols, cols < P
        else:
            own, own_mask = units, units < H
        for t in range(0, T):
            step_ptr = output_ptr + (t * B).to(tl.int64) * (D * P) + d * P  # [B, D*P] of step t
            _poison(step_ptr, batch_begin, batch_end, D * P, own, own_mask, BLOCK_B)
        for buffer in range(0, 2):
            _poison(h_state_ptr + (buffer * D + d) * B * P, batch_begin, batch_end, P, own,
                    own_mask, BLOCK_B)
        if CELL == CELL_LSTM:
            _poison(c_state_ptr + d * B * H, batch_begin, batch_end, H, units, units < H,
                    BLOCK_B)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _recurrence_bwd_kernel(
    grad_output_ptr,  # [T, B, D*P] contiguous (HAS_GRAD_OUTPUT)
    h0_ptr,  # [D, B, P]
    c0_ptr,  # [D, B, H] (LSTM)
    w_hh_ptr,  # [D, G*H, P]
    w_hr_ptr,  # [D, P, H] (HAS_PROJ)
    lengths_ptr,  # [B] int64 (HAS_LENGTHS)
    output_ptr,  # [T, B, D*P] forward output
    workspace_ptr,  # [T, B, D, WS*H] forward workspace
    grad_x_ptr,  # [T, B, D*G*H] out: grad of x_gates
    grad_hg_ptr,  # [T, B, D, G*H] float32 out: grad of W_hh h + b_hh
    grad_proj_ptr,  # [T, B, D, P] float32 out: grad of each step's projected h (HAS_PROJ)
    grad_h_state_ptr,  # [2, D, B, P] float32: grad of h after step s in buffer (T-1-s) % 2
    grad_c_state_ptr,  # [D, B, H] float32: grad of c (LSTM), grad_c_n on entry, grad_c0 on exit
    counter_ptr,  # [D, groups] int32 barrier arrivals
    B, T, H, P, phase_begin, phase_end, num_programs, group_rows, spin_limit,
    CELL: tl.constexpr, G: tl.constexpr, WS: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr,
    GRAD_X_IS_GRAD_HG: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, BLOCK_KP: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Run phases phase_begin .. phase_end of back-propagation through time (two per step).

    BLOCK_K: K chunk over G*H of the hidden phase (NUM_K resident chunks cover G*H when
    RESIDENT); BLOCK_KP: K chunk
    over P of the projection's backward in the cell phase (all of it when RESIDENT).
    GRAD_X_IS_GRAD_HG: the hidden phase reads grad_x rather than grad_hg (they are equal for
    LSTM and RNN cells; set for 16-bit layers, which exchange half the bytes that way).
    """
    j = tl.program_id(0) % num_programs  # own units and columns
    group = tl.program_id(0) // num_programs  # own batch rows: group_rows of them
    batch_begin = group * group_rows
    batch_end = tl.minimum(batch_begin + group_rows, B)
    groups = tl.num_programs(0) // num_programs
    d = tl.program_id(1)
    D = tl.num_programs(1)
    counter_ptr += d * groups + group
    GH = G * H
    units = j * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = j * BLOCK_R + tl.arange(0, BLOCK_R)
    w_gates_ptr = w_hh_ptr + d * GH * P
    w_proj_ptr = w_hr_ptr + d * P * H
    go_ptr = grad_output_ptr + d * P
    if RESIDENT:
        w_cols = _resident_chunks(w_gates_ptr, GH, cols, cols < P, P, BLOCK_K,
                                  NUM_K)  # [G*H, own cols] in NUM_K chunks
        if HAS_PROJ:
            k_proj = tl.arange(0, BLOCK_KP)
            w_units = _load_weight(w_proj_ptr, k_proj, P, units, units < H, H)  # [P, own units]

    for ph in range(phase_begin, phase_end):
        s = T - 1 - ph // 2
        if HAS_PROJ:
            _wait_for_arrivals(counter_ptr, num_programs * ph, spin_limit)
        elif ph % 2 == 1:  # without projection the cell phase reads only its own columns
            _wait_for_arrivals(counter_ptr, num_programs * ph, spin_limit)
        grad_in_ptr = grad_h_state_ptr + (((ph // 2) % 2) * D + d) * B * P
        grad_out_ptr = grad_h_state_ptr + (((ph // 2 + 1) % 2) * D + d) * B * P
        if ph % 2 == 0:  # cell phase: own units
            for b0 in range(batch_begin, batch_end, BLOCK_B):
                rows, row_mask, valid, t_row = _step_rows(lengths_ptr, b0, s, T, B, d,
                                                          HAS_LENGTHS, BLOCK_B)
                mask = row_mask[:, None] & (units < H)[None, :]
                live = mask & valid[:, None]
                keep = valid[:, None]
                t_prev = t_row - 1 + 2 * d  # the step before, in the direction's order
                has_prev = (t_prev >= 0) & (t_prev < T) & (t_prev * 0 + s > 0)  # else h_{t-1}, c_{t-1} = h0, c0
                go_rows = (t_row * B + rows) * (D * P)
                if HAS_PROJ:
                    if RESIDENT:
                        grad_step = _load_rows(grad_in_ptr, rows * P, go_ptr, go_rows, valid,
                                               row_mask, k_proj, P, HAS_GRAD_OUTPUT)
                        grad_h = _dot(grad_step, w_units,
                                      tl.zeros([BLOCK_B, BLOCK_H], tl.float32), DOT_FP32,
                                      INPUT_PRECISION)
                    else:
                        grad_h = _streamed_matmul(grad_in_ptr, rows * P, go_ptr, go_rows, valid,
                                                  row_mask, P, w_proj_ptr, H, units, units < H,
                                                  HAS_GRAD_OUTPUT, BLOCK_B, BLOCK_H, BLOCK_KP,
                                                  DOT_FP32, INPUT_PRECISION)
                else:
                    grad_h = tl.load(grad_in_ptr + (rows * P)[:, None] + units[None, :], mask=mask,
                                     other=0.0)
                    if HAS_GRAD_OUTPUT:
                        grad_h += tl.load(go_ptr + go_rows[:, None] + units[None, :], mask=live,
                                          other=0.0).to(tl.float32)
                ws = ((t_row * B + rows) * D + d)[:, None] * (WS * H) + units[None, :]
                x_ptrs = grad_x_ptr + (t_row * B + rows)[:, None] * (D * GH) + d * GH + units[None, :]
                hg_ptrs = grad_hg_ptr + ((t_row * B + rows) * D + d)[:, None] * GH + units[None, :]
                dtype = grad_x_ptr.dtype.element_ty
                if CELL == CELL_LSTM:
                    i = tl.load(workspace_ptr + ws, mask=live, other=0.0).to(tl.float32)
                    f = tl.load(workspace_ptr + ws + H, mask=live, other=0.0).to(tl.float32)
                    g = tl.load(workspace_ptr + ws + 2 * H, mask=live, other=0.0).to(tl.float32)
                    o = tl.load(workspace_ptr + ws + 3 * H, mask=live, other=0.0).to(tl.float32)
                    c = tl.load(workspace_ptr + ws + 4 * H, mask=live, other=0.0).to(tl.float32)
                    ws_prev = ((t_prev * B + rows) * D + d)[:, None] * (WS * H) + 4 * H + units[None, :]
                    c_prev = tl.load(workspace_ptr + ws_prev, mask=live & has_prev[:, None],
                                     other=0.0).to(tl.float32)
                    c_init = tl.load(c0_ptr + (d * B + rows)[:, None] * H + units[None, :],
                                     mask=live & (has_prev == 0)[:, None], other=0.0).to(tl.float32)
                    c_prev = tl.where(has_prev[:, None], c_prev, c_init)
                    grad_c_ptrs = grad_c_state_ptr + (d * B + rows)[:, None] * H + units[None, :]
                    grad_c_in = tl.load(grad_c_ptrs, mask=mask, other=0.0)
                    tanh_c = _tanh(c)
                    grad_c = grad_c_in + grad_h * o * (1.0 - tanh_c * tanh_c)
                    grad_i = tl.where(keep, grad_c * g * i * (1.0 - i), 0.0)
                    grad_f = tl.where(keep, grad_c * c_prev * f * (1.0 - f), 0.0)
                    grad_g = tl.where(keep, grad_c * i * (1.0 - g * g), 0.0)
                    grad_o = tl.where(keep, grad_h * tanh_c * o * (1.0 - o), 0.0)
                    tl.store(grad_c_ptrs, tl.where(keep, grad_c * f, grad_c_in), mask=mask)
                    tl.store(x_ptrs, grad_i.to(dtype), mask=mask)
                    tl.store(x_ptrs + H, grad_f.to(dtype), mask=mask)
                    tl.store(x_ptrs + 2 * H, grad_g.to(dtype), mask=mask)
                    tl.store(x_ptrs + 3 * H, grad_o.to(dtype), mask=mask)
                    tl.store(hg_ptrs, grad_i, mask=mask)
                    tl.store(hg_ptrs + H, grad_f, mask=mask)
                    tl.store(hg_ptrs + 2 * H, grad_g, mask=mask)
                    tl.store(hg_ptrs + 3 * H, grad_o, mask=mask)
                elif CELL == CELL_GRU:
                    r = tl.load(workspace_ptr + ws, mask=live, other=0.0).to(tl.float32)
                    z = tl.load(workspace_ptr + ws + H, mask=live, other=0.0).to(tl.float32)
                    n = tl.load(workspace_ptr + ws + 2 * H, mask=live, other=0.0).to(tl.float32)
                    hn = tl.load(workspace_ptr + ws + 3 * H, mask=live, other=0.0).to(tl.float32)
                    h_prev = tl.load(output_ptr + (t_prev * B + rows)[:, None] * (D * P) + d * P
                                     + units[None, :], mask=live & has_prev[:, None],
                                     other=0.0).to(tl.float32)
                    h_init = tl.load(h0_ptr + (d * B + rows)[:, None] * P + units[None, :],
                                     mask=live & (has_prev == 0)[:, None], other=0.0).to(tl.float32)
                    h_prev = tl.where(has_prev[:, None], h_prev, h_init)
                    grad_n = tl.where(keep, grad_h * (1.0 - z) * (1.0 - n * n), 0.0)
                    grad_r = tl.where(keep, grad_n * hn * r * (1.0 - r), 0.0)
                    grad_z = tl.where(keep, grad_h * (h_prev - n) * z * (1.0 - z), 0.0)
                    tl.store(x_ptrs, grad_r.to(dtype), mask=mask)
                    tl.store(x_ptrs + H, grad_z.to(dtype), mask=mask)
                    tl.store(x_ptrs + 2 * H, grad_n.to(dtype), mask=mask)
                    tl.store(hg_ptrs, grad_r, mask=mask)
                    tl.store(hg_ptrs + H, grad_z, mask=mask)
                    tl.store(hg_ptrs + 2 * H, grad_n * r, mask=mask)
                else:
                    h_new = tl.load(output_ptr + (t_row * B + rows)[:, None] * (D * P) + d * P
                                    + units[None, :], mask=live, other=0.0).to(tl.float32)
                    if CELL == CELL_RNN_TANH:
                        grad_pre = grad_h * (1.0 - h_new * h_new)
                    else:
                        grad_pre = tl.where(h_new <= 0.0, 0.0, grad_h)  # NaN passes, as torch
                    grad_pre = tl.where(keep, grad_pre, 0.0)
                    tl.store(x_ptrs, grad_pre.to(dtype), mask=mask)
                    tl.store(hg_ptrs, grad_pre, mask=mask)
        else:  # hidden phase: own columns of grad h_{t-1}
            for b0 in range(batch_begin, batch_end, BLOCK_B):
                rows, row_mask, valid, t_row = _step_rows(lengths_ptr, b0, s, T, B, d,
                                                          HAS_LENGTHS, BLOCK_B)
                mask = row_mask[:, None] & (cols < P)[None, :]
                keep = valid[:, None]
                hg_rows = ((t_row * B + rows) * D + d) * GH  # same offsets in grad_x
                if GRAD_X_IS_GRAD_HG:  # read 16-bit grad_x: the dot rounds to 16 bits anyway
                    exchange_ptr = grad_x_ptr
                else:
                    exchange_ptr = grad_hg_ptr
                if RESIDENT:
                    grad_prev = _resident_matmul(exchange_ptr, hg_rows, row_mask, GH, w_cols,
                                                 tl.zeros([BLOCK_B, BLOCK_R], tl.float32),
                                                 BLOCK_K, NUM_K, DOT_FP32, INPUT_PRECISION)
                else:
                    grad_prev = _streamed_matmul(exchange_ptr, hg_rows, exchange_ptr, hg_rows,
                                                 valid, row_mask, GH, w_gates_ptr, P, cols,
                                                 cols < P, False, BLOCK_B, BLOCK_R, BLOCK_K,
                                                 DOT_FP32, INPUT_PRECISION)
                grad_cols = (rows * P)[:, None] + cols[None, :]
                grad_step = tl.load(grad_in_ptr + grad_cols, mask=mask, other=0.0)
                if HAS_GRAD_OUTPUT:
                    go_ptrs = go_ptr + (t_row * B + rows)[:, None] * (D * P) + cols[None, :]
                    grad_step += tl.load(go_ptrs, mask=mask & keep, other=0.0).to(tl.float32)
                if CELL == CELL_GRU:  # h_t = ... + z * h_{t-1}
                    z_ptrs = workspace_ptr + ((t_row * B + rows) * D + d)[:, None] * (WS * H) + H + cols[None, :]
                    z = tl.load(z_ptrs, mask=mask & keep, other=0.0).to(tl.float32)
                    grad_prev += grad_step * z
                tl.store(grad_out_ptr + grad_cols, tl.where(keep, grad_prev, grad_step), mask=mask)
                if HAS_PROJ:
                    proj_ptrs = grad_proj_ptr + ((t_row * B + rows) * D + d)[:, None] * P + cols[None, :]
                    tl.store(proj_ptrs, tl.where(keep, grad_step, 0.0), mask=mask)
        _arrive(counter_ptr)

    if _timed_out(counter_ptr):  # own gate gradients, grad h of both buffers, own grad c: NaN
        for t in range(0, T):
            rows_of_step = (t * B).to(tl.int64) * D  # row (t, 0, d) of [T, B, D, *]
            for gate in tl.static_range(G):
                columns = gate * H + units
                _poison(grad_x_ptr + (rows_of_step + d) * GH, batch_begin, batch_end, D * GH,
                        columns, units < H, BLOCK_B)
                _poison(grad_hg_ptr + (rows_of_step + d) * GH, batch_begin, batch_end, D * GH,
                        columns, units < H, BLOCK_B)
            if HAS_PROJ:
                _poison(grad_proj_ptr + (rows_of_step + d) * P, batch_begin, batch_end, D * P,
                        cols, cols < P, BLOCK_B)
        for buffer in range(0, 2):
            _poison(grad_h_state_ptr + (buffer * D + d) * B * P, batch_begin, batch_end, P, cols,
                    cols < P, BLOCK_B)
        if CELL == CELL_LSTM:
            _poison(grad_c_state_ptr + d * B * H, batch_begin, batch_end, H, units, units < H,
                    BLOCK_B)
