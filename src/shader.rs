//! Shader composition: the one place where WGSL source is assembled.
//!
//! A module is `prelude + bindings + common.wgsl + team files + kernel`,
//! where the prelude holds the sizes (`WG_SIZE`, `CACHE_N`, ...) and the bindings block is
//! generated from [`BINDINGS`], the same table that builds the bind group layout, so the two
//! cannot disagree. Per-pipeline switches (weights, probability targets, soft-cap, gradient,
//! accuracy) are WGSL `override` constants.

use bytemuck::{Pod, Zeroable};

use crate::dtype::Dtype;

const COMMON: &str = include_str!("../shaders/common.wgsl");
const TEAM_WORKGROUP: &str = include_str!("../shaders/team_workgroup.wgsl");
const TEAM_REDUCE_MEMORY: &str = include_str!("../shaders/team_reduce_memory.wgsl");
const TEAM_REDUCE_SUBGROUPS: &str = include_str!("../shaders/team_reduce_subgroups.wgsl");
const TEAM_SUBGROUP: &str = include_str!("../shaders/team_subgroup.wgsl");
const ROWS: &str = include_str!("../shaders/rows.wgsl");
const STRIDED: &str = include_str!("../shaders/strided.wgsl");
const SETUP: &str = include_str!("../shaders/setup.wgsl");
const REDUCE: &str = include_str!("../shaders/reduce.wgsl");

/// Per-dispatch parameters; must match `struct Params` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct Params {
    pub classes: u32,
    pub spatial: u32,
    pub row_count: u32,
    pub row_begin: u32,
    pub logits_base: u32,
    pub targets_base: u32,
    pub upstream_base: u32,
    pub loss_base: u32,
    pub lse_base: u32,
    pub grad_base: u32,
    pub weights_base: u32,
    pub chunk_base: u32,
    pub chunk_count: u32,
    pub excluded: u32,
    pub ignore_index: i32,
    pub has_ignore: u32,
    pub reduction: u32,
    pub upstream_mode: u32,
    pub total_rows: u32,
    pub on: f32,
    pub off: f32,
    pub off_mass: f32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub z_loss: f32,
    pub split_base: u32,
    pub split_parts: u32,
    pub _pad: u32,
}

/// Rows per partial-sum slot of the setup and reduction passes.
pub(crate) const CHUNK_ROWS: u32 = 1024;
/// Workgroup size of the setup and reduction passes.
pub(crate) const AUX_WG_SIZE: u32 = 256;
/// `control` words before the partial-sum slots (`CTRL_PARTIALS`).
pub(crate) const CONTROL_HEADER_WORDS: u64 = 16;
/// Words per partial-sum slot (`PARTIAL_WORDS`).
pub(crate) const PARTIAL_WORDS: u64 = 4;
/// Words per part record of a split row (`SPLIT_WORDS` in rows.wgsl).
pub(crate) const SPLIT_WORDS: u64 = 8;

/// The storage bindings of group 0, in binding order after the uniform `P` at binding 0.
pub(crate) struct Binding {
    /// The WGSL variable.
    pub name: &'static str,
    /// The `LossBuffers` field (or plan scratch) bound there, as errors name it.
    pub arg: &'static str,
    pub ty: &'static str,
    pub writable: bool,
}

pub(crate) const BINDINGS: [Binding; 8] = [
    Binding {
        name: "logits",
        arg: "logits",
        ty: "array<f32>",
        writable: false,
    },
    Binding {
        name: "targets",
        arg: "targets",
        ty: "array<u32>",
        writable: false,
    },
    Binding {
        name: "weights",
        arg: "weights",
        ty: "array<f32>",
        writable: false,
    },
    Binding {
        name: "upstream",
        arg: "upstream",
        ty: "array<f32>",
        writable: false,
    },
    Binding {
        name: "row_loss",
        arg: "loss",
        ty: "array<f32>",
        writable: true,
    },
    Binding {
        name: "lse",
        arg: "lse",
        ty: "array<f32>",
        writable: true,
    },
    Binding {
        name: "grad",
        arg: "grad",
        ty: "array<f32>",
        writable: true,
    },
    Binding {
        name: "control",
        arg: "scratch",
        ty: "array<atomic<u32>>",
        writable: true,
    },
];

/// Index in [`BINDINGS`] of the logits, the only binding whose access depends on the plan.
pub(crate) const LOGITS: usize = 0;
/// Index in [`BINDINGS`] of the gradient.
pub(crate) const GRAD: usize = 6;

/// The WGSL type of binding `i`. 16-bit data is bound as u32 words holding two elements;
/// where words are written by more than one invocation (the gradient, and the logits when the
/// gradient overwrites them) they are atomic so that each can update its own half.
fn binding_type(i: usize, key: &ModuleKey) -> &'static str {
    let sixteen = |d: Dtype| d != Dtype::F32;
    match i {
        LOGITS | GRAD if key.wide => "array<vec4<f32>>",
        LOGITS if sixteen(key.dtype) && key.in_place && !key.private_words => "array<atomic<u32>>",
        LOGITS if sixteen(key.dtype) => "array<u32>",
        GRAD if sixteen(key.grad_dtype) && !key.in_place && !key.private_words => {
            "array<atomic<u32>>"
        }
        GRAD if sixteen(key.grad_dtype) && !key.in_place => "array<u32>",
        _ => BINDINGS[i].ty,
    }
}

/// Whether binding `i` is writable; the logits are when the gradient overwrites them.
pub(crate) fn binding_writable(i: usize, in_place: bool) -> bool {
    BINDINGS[i].writable || (i == LOGITS && in_place)
}

/// The kernel families, one WGSL file each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Rows,
    Strided,
    Setup,
    Reduce,
}

/// What a "team" (the invocations that reduce one row together) is, and how it reduces: a
/// workgroup (`team_workgroup.wgsl`) with `team_reduce_memory.wgsl` or
/// `team_reduce_subgroups.wgsl`, or a subgroup (`team_subgroup.wgsl`); the same interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Team {
    /// The workgroup, through workgroup memory (no subgroup operations needed).
    Workgroup,
    /// The workgroup, through subgroup operations; the adapter's smallest subgroup size.
    WorkgroupSubgroups(u32),
    /// One subgroup: no barriers.
    Subgroup,
}

/// Everything that changes a module's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ModuleKey {
    pub family: Family,
    pub wg_size: u32,
    pub cache_n: u32,
    pub team: Team,
    pub in_place: bool,
    pub dtype: Dtype,
    pub grad_dtype: Dtype,
    /// f32 logits and gradient read and written as `vec4` units (see `accessors`).
    pub wide: bool,
    /// 16-bit rows never share a 32-bit word (an even class count, row kernel): words are
    /// written plainly instead of half by half with atomics.
    pub private_words: bool,
}

/// Assembles the WGSL source of a module.
pub(crate) fn compose(key: &ModuleKey) -> String {
    let mut src = String::with_capacity(16 * 1024);
    src.push_str("// Generated by lsce::shader::compose.\n");
    src.push_str(&format!(
        "const WG_SIZE: u32 = {}u;\nconst CACHE_N: u32 = {}u;\nconst CHUNK_ROWS: u32 = {}u;\n",
        key.wg_size, key.cache_n, CHUNK_ROWS
    ));
    if let Team::WorkgroupSubgroups(min_subgroup) = key.team {
        src.push_str(&format!(
            "const MAX_SUBGROUPS: u32 = {}u;\n",
            (key.wg_size / min_subgroup).max(1)
        ));
    }
    // `P` is copied into the private `Q` once per invocation (`load_params`): a uniform read
    // after a storage write may not be hoisted out of a loop by a compiler that cannot prove
    // the two do not alias, a private copy always can.
    src.push_str("@group(0) @binding(0) var<uniform> P: Params;\nvar<private> Q: Params;\nfn load_params() { Q = P; }\n");
    for (i, b) in BINDINGS.iter().enumerate() {
        let access = if binding_writable(i, key.in_place) {
            "read_write"
        } else {
            "read"
        };
        src.push_str(&format!(
            "@group(0) @binding({}) var<storage, {access}> {}: {};\n",
            i + 1,
            b.name,
            binding_type(i, key)
        ));
    }
    src.push_str(&accessors(key));
    src.push_str(COMMON);
    match key.team {
        Team::Workgroup => src.extend([TEAM_WORKGROUP, TEAM_REDUCE_MEMORY]),
        Team::WorkgroupSubgroups(_) => src.extend([TEAM_WORKGROUP, TEAM_REDUCE_SUBGROUPS]),
        Team::Subgroup => src.push_str(TEAM_SUBGROUP),
    }
    src.push_str(match key.family {
        Family::Rows => ROWS,
        Family::Strided => STRIDED,
        Family::Setup => SETUP,
        Family::Reduce => REDUCE,
    });
    src
}

/// The element accessors the kernels use, for the logits' and gradient's dtypes:
/// `UNIT` (logits per unit: 1 or, `wide`, 4 f32; 4 16-bit), `load_unit(u) -> vec4<f32>` (unit u's logits, unused
/// lanes 0), `load_elem(g) -> f32`, `store_unit(u, v, g_begin, g_end)` (the gradient of unit
/// u's logits that lie in `[g_begin, g_end)`) and `store_elem(g, v)`. `u` and `g` index the logits binding; the
/// gradient binding is addressed through `Q.grad_base - Q.logits_base`, which the host keeps
/// congruent modulo UNIT (all offsets are multiples of 4 bytes).
fn accessors(key: &ModuleKey) -> String {
    let mut src = String::new();
    let word = if key.in_place && !key.private_words {
        "atomicLoad(&logits[w])"
    } else {
        "logits[w]"
    };
    match key.dtype {
        Dtype::F32 if key.wide => src.push_str(
            "const UNIT: u32 = 4u;\n\
             fn load_elem(g: u32) -> f32 { return logits[g >> 2u][g & 3u]; }\n\
             fn load_unit(u: u32) -> vec4<f32> { return logits[u]; }\n",
        ),
        Dtype::F32 => src.push_str(
            "const UNIT: u32 = 1u;\n\
             fn load_elem(g: u32) -> f32 { return logits[g]; }\n\
             fn load_unit(u: u32) -> vec4<f32> { return vec4<f32>(logits[u], 0.0, 0.0, 0.0); }\n",
        ),
        Dtype::F16 | Dtype::Bf16 => {
            let decode = if key.dtype == Dtype::F16 {
                "unpack2x16float(x)"
            } else {
                "vec2<f32>(bitcast<f32>(x << 16u), bitcast<f32>(x & 0xffff0000u))"
            };
            // A unit is two words, four logits: full vec4 lanes, like wide f32. The second word
            // of a unit at the end of the binding may lie past it: bounds-checked reads give
            // a value that the row's lane mask discards.
            src.push_str(&format!(
                "const UNIT: u32 = 4u;\n\
                 fn load_word(w: u32) -> vec2<f32> {{ let x = {word}; return {decode}; }}\n\
                 fn load_unit(u: u32) -> vec4<f32> {{ return vec4<f32>(load_word(2u * u), load_word(2u * u + 1u)); }}\n\
                 fn load_elem(g: u32) -> f32 {{ return load_word(g >> 1u)[g & 1u]; }}\n"
            ));
        }
    }
    let grad_dtype = if key.in_place {
        key.dtype
    } else {
        key.grad_dtype
    };
    let target = if key.in_place { "logits" } else { "grad" };
    let index = if key.in_place {
        "i"
    } else {
        "i + Q.grad_base - Q.logits_base"
    };
    match grad_dtype {
        // A whole unit inside the row is one vec4 store; a unit shared with a neighbouring row
        // (K not a multiple of 4) is written component by component, never read back.
        Dtype::F32 if key.wide => {
            let unit_index = if key.in_place {
                "u"
            } else {
                "u + Q.grad_base / 4u - Q.logits_base / 4u"
            };
            src.push_str(&format!(
                "fn store_elem(i: u32, v: f32) {{ let j = {index}; {target}[j >> 2u][j & 3u] = v; }}\n\
                 fn store_unit(u: u32, v: vec4<f32>, g_begin: u32, g_end: u32) {{\n\
                     let g = u * 4u;\n\
                     if (g >= g_begin && g + 4u <= g_end) {{\n\
                         {target}[{unit_index}] = v;\n\
                     }} else {{\n\
                         for (var i = 0u; i < 4u; i++) {{\n\
                             if (g + i >= g_begin && g + i < g_end) {{ store_elem(g + i, v[i]); }}\n\
                         }}\n\
                     }}\n\
                 }}\n"
            ));
        }
        Dtype::F32 => src.push_str(&format!(
            "fn store_elem(i: u32, v: f32) {{ {target}[{index}] = v; }}\n\
             fn store_unit(u: u32, v: vec4<f32>, g_begin: u32, g_end: u32) {{\n\
                 for (var i = 0u; i < UNIT; i++) {{\n\
                     let g = u * UNIT + i;\n\
                     if (g >= g_begin && g < g_end) {{ store_elem(g, v[i]); }}\n\
                 }}\n\
             }}\n"
        )),
        Dtype::F16 | Dtype::Bf16 => {
            let encode = if grad_dtype == Dtype::F16 {
                "pack2x16float(v)"
            } else {
                "bf16_bits(v.x) | (bf16_bits(v.y) << 16u)"
            };
            // Word index i is in the logits binding; both bases count 2-byte elements, so
            // word indices shift by the same base difference halved.
            let word_index = if key.in_place {
                "i"
            } else {
                "i + Q.grad_base / 2u - Q.logits_base / 2u"
            };
            src.push_str(
                "fn bf16_bits(x: f32) -> u32 {\n\
                     let b = bitcast<u32>(x);\n\
                     if (is_nan(x)) { return (b >> 16u) | 0x40u; }\n\
                     return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;\n\
                 }\n\
                 fn store_elem(g: u32, v: f32) { store_word(g >> 1u, vec2<f32>(v), g, g + 1u); }\n\
                 fn store_unit(u: u32, v: vec4<f32>, g_begin: u32, g_end: u32) {\n\
                     store_word(2u * u, v.xy, g_begin, g_end);\n\
                     store_word(2u * u + 1u, v.zw, g_begin, g_end);\n\
                 }\n",
            );
            // Writes `bits` into the halves of word w selected by `mask`.
            let (whole, half) = if key.private_words {
                // No other invocation touches the word: plain stores.
                (
                    format!("{target}[w] = bits;"),
                    format!("{target}[w] = ({target}[w] & ~mask) | (bits & mask);"),
                )
            } else {
                // A word shared with a neighbouring row (odd K) is updated half by half,
                // atomically, so that the neighbour's half survives.
                (
                    format!("atomicStore(&{target}[w], bits);"),
                    format!("atomicAnd(&{target}[w], ~mask); atomicOr(&{target}[w], bits & mask);"),
                )
            };
            src.push_str(&format!(
                "// The gradient of the logits of word i that lie in [g_begin, g_end).\n\
                 fn store_word(i: u32, v: vec2<f32>, g_begin: u32, g_end: u32) {{\n\
                     let w = {word_index};\n\
                     let bits = {encode};\n\
                     let lo = 2u * i >= g_begin && 2u * i < g_end;\n\
                     let hi = 2u * i + 1u >= g_begin && 2u * i + 1u < g_end;\n\
                     if (lo && hi) {{\n\
                         {whole}\n\
                     }} else if (lo || hi) {{\n\
                         let mask = select(0xffff0000u, 0xffffu, lo);\n\
                         {half}\n\
                     }}\n\
                 }}\n"
            ));
        }
    }
    src
}
