// Kernels of the benchmark (benches/lsce/), not of the library: the references the fused loss is
// measured against (copy, read) and the unfused baseline.
//
// * fill_main, copy_main, read_main: streaming kernels over a flat buffer seen as vec4s of u32
//   words (copy_main and read_main never look inside a word, so they serve every dtype, sized
//   by bytes). Every 8 neighbouring invocations walk one contiguous block together, on
//   neighbouring vec4s: 128 bytes per step, coalesced on a GPU, and sequential for a CPU
//   adapter, which runs 8 lanes as one SIMD thread to completion. A capped number of workgroups
//   covers any size. copy_main is the practical bandwidth limit the fused loss is compared with
//   (every byte read once, written once); read_main is the limit for the forward pass, which
//   only reads.
// * lse_main .. grad_main: label-smoothed cross-entropy computed the way composite frameworks
//   run it (PyTorch eager: log_softmax, the smoothed nll, the mean, then the backward from the
//   saved log_softmax), one kernel per step, each a full sweep over memory. This is the unfused
//   baseline; it is deliberately plain (one workgroup per row, a workgroup-memory tree
//   reduction) rather than tuned.
//
// The logits and the gradient are in the element format `FORMAT` (the bench's --dtype): f32,
// or IEEE binary16 / bfloat16 packed two per u32 word, element 2i in the low half, as the
// crate lays them out. The unfused steps decode 16-bit logits as they read them and keep their
// intermediates (log_softmax, log-sum-exp, row losses) in f32, as PyTorch's mixed precision
// runs cross_entropy in f32; grad_main encodes the gradient back to the logits' format.
//
// Rows are processed in windows (`P`, one per window) so that no binding exceeds the device's
// max_storage_buffer_binding_size; the host binds each window at an aligned byte offset and
// `P.base` (`P.logsm_base`) is the element offset of the window's first row within the
// logits' and gradient's (the log_softmax's) binding.

struct Params {
    rows: u32,         // rows in this window
    classes: u32,
    row_begin: u32,    // first row of the window (indexes labels, lse, row_loss)
    base: u32,         // element offset of the window's first row in `logits` / `grad`
    logsm_base: u32,   // element offset of the window's first row in `logsm`
    vec4s: u32,        // vec4s the streaming kernels cover in this window
    vec4_begin: u32,   // index in the whole buffer of the first of them (seeds the fill)
    total_rows: u32,
    ignore_index: i32,
    on: f32,           // target probability of the label
    off: f32,          // target probability of every other class
    mass: f32,         // sum of the target probabilities of a row
    sink: u32,         // a value read_main's sum never equals in practice (see there)
}

// The element format of the logits and the gradient, set per pipeline by the host; a constant
// there, so the untaken branches below cost nothing.
override FORMAT: u32 = 0u;
const F32: u32 = 0u;
const F16: u32 = 1u;
const BF16: u32 = 2u;

const WG: u32 = 256u;
// The most negative finite f32: a row starting with -inf then gives exp(-inf - m) = 0, not NaN.
const NEG_BIG: f32 = -3.4028235e38;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> logits: array<u32>;         // in FORMAT
// log_softmax, f32 in every FORMAT; with f32 the gradient is then written over it.
@group(0) @binding(2) var<storage, read_write> logsm: array<f32>;
@group(0) @binding(3) var<storage, read> labels: array<i32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;     // [mean loss, counted rows]
@group(0) @binding(7) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(8) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read_write> fill: array<vec4<u32>>;
// The 16-bit gradient. Atomic because a word can hold the last element of one row and the
// first of the next, written by different workgroups.
@group(0) @binding(10) var<storage, read_write> grad: array<atomic<u32>>;

var<workgroup> red: array<f32, WG>;

// ---- element formats ----

// bfloat16 bits of `x` (finite), rounded to nearest even.
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Two 16-bit FORMAT values in one word, `lo` in the low half.
fn encode2(lo: f32, hi: f32) -> u32 {
    if (FORMAT == F16) {
        return pack2x16float(vec2<f32>(lo, hi));
    }
    return bf16_bits(lo) | (bf16_bits(hi) << 16u);
}

// Logit `e` of the `logits` binding, widened to f32.
fn logit(e: u32) -> f32 {
    if (FORMAT == F32) {
        return bitcast<f32>(logits[e]);
    }
    let w = logits[e >> 1u];
    if (FORMAT == F16) {
        return unpack2x16float(w)[e & 1u];
    }
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (e & 1u) == 1u));
}

// ---- streaming kernels ----

// lowbias32 (Chris Wellons): a cheap integer hash with good avalanche, for reproducible logits.
fn hash(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// Logit number `i` of the buffer: uniform in [-8, 8).
fn logit_at(i: u32) -> f32 {
    return f32(hash(i) >> 8u) * (16.0 / 16777216.0) - 8.0;
}

const BLOCK_LANES: u32 = 8u;

// The block of vec4s of this invocation's group of 8: [begin, end).
fn block(wid: u32, lid: u32, groups: u32) -> vec2<u32> {
    let blocks = groups * (WG / BLOCK_LANES);
    let size = (P.vec4s + blocks - 1u) / blocks;
    let begin = min((wid * WG + lid) / BLOCK_LANES * size, P.vec4s);
    return vec2<u32>(begin, min(begin + size, P.vec4s));
}

// Writes logit_at(e) in FORMAT for every element e of the window: 4 f32 or 8 16-bit values per
// vec4.
@compute @workgroup_size(WG)
fn fill_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let b = block(wid.x, lid, nwg.x);
    for (var i = b.x + lid % BLOCK_LANES; i < b.y; i += BLOCK_LANES) {
        var words: vec4<u32>;
        if (FORMAT == F32) {
            let e = (P.vec4_begin + i) * 4u;
            words = bitcast<vec4<u32>>(vec4<f32>(logit_at(e), logit_at(e + 1u), logit_at(e + 2u), logit_at(e + 3u)));
        } else {
            let e = (P.vec4_begin + i) * 8u;
            for (var j = 0u; j < 4u; j++) {
                words[j] = encode2(logit_at(e + 2u * j), logit_at(e + 2u * j + 1u));
            }
        }
        fill[i] = words;
    }
}

@compute @workgroup_size(WG)
fn copy_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let b = block(wid.x, lid, nwg.x);
    for (var i = b.x + lid % BLOCK_LANES; i < b.y; i += BLOCK_LANES) {
        dst[i] = src[i];
    }
}

@compute @workgroup_size(WG)
fn read_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    var acc = vec4<u32>(0u);
    let b = block(wid.x, lid, nwg.x);
    for (var i = b.x + lid % BLOCK_LANES; i < b.y; i += BLOCK_LANES) {
        acc += src[i];
    }
    // A store that depends on the (wrapping, integer: any bits are fine) sum keeps the compiler
    // from dropping the loads; it (almost) never happens, and when it does it only scribbles on
    // the copy's destination.
    if (acc.x == P.sink) {
        dst[(wid.x * WG + lid) % max(P.vec4s, 1u)] = acc;
    }
}

// ---- the unfused loss ----

// Workgroup reduction of one value per invocation (max, or sum). Every invocation gets the result.
fn reduce(lid: u32, value: f32, take_max: bool) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let other = red[lid + s];
            red[lid] = select(red[lid] + other, max(red[lid], other), take_max);
        }
        workgroupBarrier();
    }
    let result = red[0];
    workgroupBarrier();
    return result;
}

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn ignored(label: i32) -> bool {
    return label == P.ignore_index;
}

// Step 1: per-row max, then log-sum-exp (two sweeps over the row, as a max-then-sum kernel does).
@compute @workgroup_size(WG)
fn lse_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = row_of(wid, nwg);
    if (r >= P.rows) {
        return;
    }
    let e0 = P.base + r * P.classes;
    var m = NEG_BIG;
    for (var c = lid; c < P.classes; c += WG) {
        m = max(m, logit(e0 + c));
    }
    m = reduce(lid, m, true);
    var s = 0.0;
    for (var c = lid; c < P.classes; c += WG) {
        s += exp(logit(e0 + c) - m);
    }
    s = reduce(lid, s, false);
    if (lid == 0u) {
        lse[P.row_begin + r] = m + log(s);
    }
}

// Step 2: materialise log_softmax = x - lse.
@compute @workgroup_size(WG)
fn logsm_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = row_of(wid, nwg);
    if (r >= P.rows) {
        return;
    }
    let e0 = P.base + r * P.classes;
    let l0 = P.logsm_base + r * P.classes;
    let l = lse[P.row_begin + r];
    for (var c = lid; c < P.classes; c += WG) {
        logsm[l0 + c] = logit(e0 + c) - l;
    }
}

// Step 3: the smoothed loss of each row, -sum_c q_c log_softmax_c (0 for ignored rows).
@compute @workgroup_size(WG)
fn loss_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = row_of(wid, nwg);
    if (r >= P.rows) {
        return;
    }
    let l0 = P.logsm_base + r * P.classes;
    var s = 0.0;
    for (var c = lid; c < P.classes; c += WG) {
        s += logsm[l0 + c];
    }
    s = reduce(lid, s, false);
    if (lid == 0u) {
        let y = labels[P.row_begin + r];
        var loss = 0.0;
        if (!ignored(y)) {
            loss = -(P.off * s + (P.on - P.off) * logsm[l0 + u32(y)]);
        }
        row_loss[P.row_begin + r] = loss;
    }
}

// Step 4 (one workgroup, all rows): the mean over non-ignored rows, and their count.
@compute @workgroup_size(WG)
fn mean_main(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var n = 0.0;
    for (var r = lid; r < P.total_rows; r += WG) {
        s += row_loss[r];
        n += select(1.0, 0.0, ignored(labels[r]));
    }
    s = reduce(lid, s, false);
    n = reduce(lid, n, false);
    if (lid == 0u) {
        out[0] = s / n;
        out[1] = n;
    }
}

// Step 5: the backward from the saved log_softmax, (softmax * mass - q) / count: f32 written
// over the log_softmax, 16-bit packed into `grad`.
@compute @workgroup_size(WG)
fn grad_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = row_of(wid, nwg);
    if (r >= P.rows) {
        return;
    }
    let l0 = P.logsm_base + r * P.classes;
    let y = labels[P.row_begin + r];
    let scale = select(1.0 / out[1], 0.0, ignored(y));
    if (FORMAT == F32) {
        for (var c = lid; c < P.classes; c += WG) {
            logsm[l0 + c] = grad_of(l0, c, y, scale);
        }
        return;
    }
    // One invocation per word of the row's elements [e0, e1); a word shared with a neighbouring
    // row is updated half by half, so that the neighbour's half survives.
    let e0 = P.base + r * P.classes;
    let e1 = e0 + P.classes;
    for (var w = e0 / 2u + lid; 2u * w < e1; w += WG) {
        let lo = 2u * w >= e0;
        let hi = 2u * w + 1u < e1;
        var g = vec2<f32>(0.0);
        if (lo) {
            g.x = grad_of(l0, 2u * w - e0, y, scale);
        }
        if (hi) {
            g.y = grad_of(l0, 2u * w + 1u - e0, y, scale);
        }
        let bits = encode2(g.x, g.y);
        if (lo && hi) {
            atomicStore(&grad[w], bits);
        } else if (lo) {
            atomicAnd(&grad[w], 0xffff0000u);
            atomicOr(&grad[w], bits & 0xffffu);
        } else {
            atomicAnd(&grad[w], 0xffffu);
            atomicOr(&grad[w], bits & 0xffff0000u);
        }
    }
}

// The gradient of class `c` of the row whose log_softmax starts at `l0`.
fn grad_of(l0: u32, c: u32, y: i32, scale: f32) -> f32 {
    let q = select(P.off, P.on, i32(c) == y);
    return (exp(logsm[l0 + c]) * P.mass - q) * scale;
}
