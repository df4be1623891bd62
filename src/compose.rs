//! Shader composition: the one place where a module's WGSL source is assembled.
//!
//! A module is the generated prelude followed by `.wgsl` fragments from `shaders/`:
//!
//! ```text
//! prelude     sizes (WG_SIZE, CACHE_N, MAX_SUBGROUPS), the shared layouts of src/layout.rs
//!             (struct Params, the control and record word constants), the bindings (from
//!             layout::Slot, the table that also builds the bind group layout), and the few
//!             one-line primitives that name the gradient's binding (`put_*`, `logit_word`)
//! accessors   load_{f32,f32x4,16bit}.wgsl, store_{f32,f32x4,16bit}.wgsl, {f16,bf16}.wgsl
//! common.wgsl the per-logit math
//! team        team_subgroup.wgsl | team_workgroup.wgsl + team_reduce_{memory,subgroups}.wgsl
//! records     shard_records.wgsl (the row families: vocabulary shards' records)
//! family      rows.wgsl | strided.wgsl | setup.wgsl | finalize.wgsl
//! ```
//!
//! The fused linear head's module ([`Family::Linear`], src/linear) is the same prelude (its
//! group 0 is the loss's, with f32 `logits`: the head's chunk of logits) without a team,
//! then its own bind group 1 (layout::HeadSlot, `LinearParams`, the `hidden_at`/`head_at`/
//! `bias_at` accessors of its inputs' dtype), shard_records.wgsl (its vocabulary blocks are
//! shards of one device), matmul.wgsl, how its operands are shared (matmul_portable.wgsl, or
//! matmul_subgroups.wgsl where the kernel uses subgroups: the module's [`Team`]) and
//! linear.wgsl.
//!
//! Adding a kernel family touches: its `shaders/<family>.wgsl` (entry points that start with
//! `load_params()` and `team_begin(..)`, the team interface of team_workgroup.wgsl, the word
//! constants of src/layout.rs), a [`Family`] variant with its fragment here (and in
//! `every_module_key`, so the naga test covers it), any record it keeps in `control` as a
//! `shared_layout!` in src/layout.rs, its pipelines in src/plan.rs (a [`RowPass`] of src/row_kernel.rs if it runs per
//! row), its dispatch in src/encode.rs, its CPU mirror in src/cpu.rs, and a test that holds the
//! two together.
//!
//! [`RowPass`]: crate::row_kernel::RowPass
//!
//! Everything else that varies per pipeline (weights, probability targets, soft-cap, gradient,
//! accuracy) is a WGSL `override` constant, set at pipeline creation ([`crate::kernel`]).
//! The tests below compose every module the crate can build and check each one with naga, for
//! every backend wgpu translates to, before any GPU sees it.

use crate::dtype::Dtype;
use crate::layout::{self, HeadSlot, Slot, AUX_WG_SIZE};

/// The fragments, by file name.
mod fragment {
    pub const COMMON: &str = include_str!("../shaders/common.wgsl");
    pub const LOAD_F32: &str = include_str!("../shaders/load_f32.wgsl");
    pub const LOAD_F32X4: &str = include_str!("../shaders/load_f32x4.wgsl");
    pub const LOAD_16BIT: &str = include_str!("../shaders/load_16bit.wgsl");
    pub const STORE_F32: &str = include_str!("../shaders/store_f32.wgsl");
    pub const STORE_F32X4: &str = include_str!("../shaders/store_f32x4.wgsl");
    pub const STORE_16BIT: &str = include_str!("../shaders/store_16bit.wgsl");
    pub const F16: &str = include_str!("../shaders/f16.wgsl");
    pub const BF16: &str = include_str!("../shaders/bf16.wgsl");
    pub const TEAM_WORKGROUP: &str = include_str!("../shaders/team_workgroup.wgsl");
    pub const TEAM_REDUCE_MEMORY: &str = include_str!("../shaders/team_reduce_memory.wgsl");
    pub const TEAM_REDUCE_SUBGROUPS: &str = include_str!("../shaders/team_reduce_subgroups.wgsl");
    pub const TEAM_SUBGROUP: &str = include_str!("../shaders/team_subgroup.wgsl");
    pub const ROWS: &str = include_str!("../shaders/rows.wgsl");
    pub const STRIDED: &str = include_str!("../shaders/strided.wgsl");
    pub const SHARD_RECORDS: &str = include_str!("../shaders/shard_records.wgsl");
    pub const SETUP: &str = include_str!("../shaders/setup.wgsl");
    pub const FINALIZE: &str = include_str!("../shaders/finalize.wgsl");
    pub const MATMUL: &str = include_str!("../shaders/matmul.wgsl");
    pub const MATMUL_PORTABLE: &str = include_str!("../shaders/matmul_portable.wgsl");
    pub const MATMUL_SUBGROUPS: &str = include_str!("../shaders/matmul_subgroups.wgsl");
    pub const LINEAR: &str = include_str!("../shaders/linear.wgsl");
}

/// The kernel families, one WGSL file each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    /// `rows.wgsl`: one team per row (or per part of a split row).
    Rows,
    /// `strided.wgsl`: `[N, C, d..]` logits, one invocation per row.
    Strided,
    /// `setup.wgsl`: the mean's denominator, the weighted off-mass, the label check.
    Setup,
    /// `finalize.wgsl`: the per-row losses reduced to the summary (`Sum`, `Mean`).
    Finalize,
    /// `linear.wgsl` on `matmul.wgsl`: the fused linear head (src/linear), whose logits come
    /// from hidden states and a head weight (bind group 1) instead of a buffer.
    Linear,
}

/// What a *team* (the invocations that reduce one row together) is, and how it reduces: a
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
    /// f32 logits and gradient read and written as `vec4` units (*wide*; otherwise *narrow*).
    pub wide: bool,
    /// 16-bit rows never share a 32-bit word (an even class count, row kernel): words are
    /// written plainly instead of half by half with atomics.
    pub private_words: bool,
    /// The element type of the hidden states, head and bias ([`Family::Linear`]; `F32`
    /// otherwise). The linear family's group 0 is the loss's with f32 logits: its chunk.
    pub head_dtype: Dtype,
}

impl ModuleKey {
    /// The fused linear head's module for inputs of `head_dtype`: group 0 is the in-place loss
    /// layout (its f32 `logits` are the head's chunk of logits), group 1 the head's. With
    /// [`Team::WorkgroupSubgroups`] the matmul and the gradient products hand the rows that
    /// eight invocations share around by subgroup broadcasts (shaders/matmul_subgroups.wgsl),
    /// with [`Team::Workgroup`] they read them from workgroup memory only
    /// (shaders/matmul_portable.wgsl).
    pub fn linear(head_dtype: Dtype, team: Team) -> Self {
        Self {
            family: Family::Linear,
            wg_size: AUX_WG_SIZE,
            cache_n: 1,
            team,
            in_place: true,
            dtype: Dtype::F32,
            grad_dtype: Dtype::F32,
            wide: false,
            private_words: true,
            head_dtype,
        }
    }

    /// Whether 32-bit words of `slot` are written by more than one invocation, so that they
    /// must be atomic: 16-bit gradient words shared by neighbouring rows (and the logits when
    /// the gradient overwrites them).
    fn shared_words(&self, slot: Slot) -> bool {
        let sixteen = |d: Dtype| d != Dtype::F32;
        !self.private_words
            && match slot {
                Slot::Logits => self.in_place && sixteen(self.dtype),
                Slot::Grad => !self.in_place && sixteen(self.grad_dtype),
                _ => false,
            }
    }

    /// The WGSL type of `slot`: 16-bit data is bound as u32 words holding two elements, wide
    /// f32 data as `vec4`s.
    fn binding_type(&self, slot: Slot) -> &'static str {
        let elements = matches!(slot, Slot::Logits | Slot::Grad);
        let sixteen = match slot {
            Slot::Logits => self.dtype != Dtype::F32,
            Slot::Grad => !self.in_place && self.grad_dtype != Dtype::F32,
            _ => false,
        };
        match () {
            _ if elements && self.wide => "array<vec4<f32>>",
            _ if self.shared_words(slot) => "array<atomic<u32>>",
            _ if sixteen => "array<u32>",
            _ => slot.info().wgsl,
        }
    }

    /// The binding the gradient is written to.
    fn gradient_slot(&self) -> Slot {
        if self.in_place {
            Slot::Logits
        } else {
            Slot::Grad
        }
    }
}

/// Assembles the WGSL source of a module.
pub(crate) fn compose(key: &ModuleKey) -> String {
    let mut src = String::with_capacity(32 * 1024);
    src.push_str("// Generated by lsce::compose.\n");
    src.push_str(&format!(
        "const WG_SIZE: u32 = {}u;\nconst CACHE_N: u32 = {}u;\n",
        key.wg_size, key.cache_n
    ));
    if let Team::WorkgroupSubgroups(min_subgroup) = key.team {
        src.push_str(&format!(
            "const MAX_SUBGROUPS: u32 = {}u;\n",
            (key.wg_size / min_subgroup).max(1)
        ));
    }
    src.push_str(&layout::wgsl_declarations());
    // `P` is copied into the private `Q` once per invocation (`load_params`): a uniform read
    // after a storage write may not be hoisted out of a loop by a compiler that cannot prove
    // the two do not alias, a private copy always can.
    src.push_str(
        "@group(0) @binding(0) var<uniform> P: Params;\n\
         var<private> Q: Params;\n\
         fn load_params() { Q = P; }\n",
    );
    for slot in Slot::ALL {
        let access = if slot.writable(key.in_place) {
            "read_write"
        } else {
            "read"
        };
        src.push_str(&format!(
            "@group(0) @binding({}) var<storage, {access}> {}: {};\n",
            slot.binding(),
            slot.info().name,
            key.binding_type(slot)
        ));
    }
    src.push_str(&primitives(key));
    let sixteen = key.dtype != Dtype::F32;
    src.push_str(match key.dtype {
        Dtype::F32 => "",
        Dtype::F16 => fragment::F16,
        Dtype::Bf16 => fragment::BF16,
    });
    src.push_str(match key.dtype {
        _ if sixteen => fragment::LOAD_16BIT,
        _ if key.wide => fragment::LOAD_F32X4,
        _ => fragment::LOAD_F32,
    });
    src.push_str(match key.grad_dtype {
        _ if key.in_place && sixteen => fragment::STORE_16BIT,
        Dtype::F16 | Dtype::Bf16 if !key.in_place => fragment::STORE_16BIT,
        _ if key.wide => fragment::STORE_F32X4,
        _ => fragment::STORE_F32,
    });
    src.push_str(fragment::COMMON);
    if key.family == Family::Linear {
        src.push_str(&linear_prelude(key));
        src.extend([fragment::SHARD_RECORDS, fragment::MATMUL]);
        src.push_str(match key.team {
            Team::Workgroup => fragment::MATMUL_PORTABLE,
            _ => fragment::MATMUL_SUBGROUPS,
        });
        src.push_str(fragment::LINEAR);
        return src;
    }
    match key.team {
        Team::Workgroup => src.extend([fragment::TEAM_WORKGROUP, fragment::TEAM_REDUCE_MEMORY]),
        Team::WorkgroupSubgroups(_) => {
            src.extend([fragment::TEAM_WORKGROUP, fragment::TEAM_REDUCE_SUBGROUPS])
        }
        Team::Subgroup => src.push_str(fragment::TEAM_SUBGROUP),
    }
    // The vocabulary shards' records, for the shard passes of both row families.
    if matches!(key.family, Family::Rows | Family::Strided) {
        src.push_str(fragment::SHARD_RECORDS);
    }
    src.push_str(match key.family {
        Family::Rows => fragment::ROWS,
        Family::Strided => fragment::STRIDED,
        Family::Setup => fragment::SETUP,
        Family::Finalize => fragment::FINALIZE,
        Family::Linear => unreachable!("composed above"),
    });
    src
}

/// The linear head's bind group 1 (layout::HeadSlot) and its element accessors: `hidden_at`,
/// `head_at`, `bias_at` by element index, in f32 whatever the inputs' type (16-bit inputs are
/// bound as u32 words of two elements, decoded by f16.wgsl or bf16.wgsl).
fn linear_prelude(key: &ModuleKey) -> String {
    let sixteen = key.head_dtype != Dtype::F32;
    let mut src = String::from("@group(1) @binding(0) var<uniform> LP: LinearParams;\n");
    for slot in HeadSlot::ALL {
        let (name, writable) = slot.info();
        let (access, ty) = match (writable, sixteen) {
            (true, _) => ("read_write", "array<f32>"),
            (false, true) => ("read", "array<u32>"),
            (false, false) => ("read", "array<f32>"),
        };
        src.push_str(&format!(
            "@group(1) @binding({}) var<storage, {access}> {name}: {ty};\n",
            slot.binding()
        ));
    }
    src.push_str(match key.head_dtype {
        Dtype::F32 => "",
        Dtype::F16 => fragment::F16,
        Dtype::Bf16 => fragment::BF16,
    });
    for name in ["hidden", "head", "bias"] {
        src.push_str(&if sixteen {
            format!(
                "fn {name}_at(e: u32) -> f32 {{ return decode_word({name}[e >> 1u])[e & 1u]; }}\n"
            )
        } else {
            format!("fn {name}_at(e: u32) -> f32 {{ return {name}[e]; }}\n")
        });
    }
    src
}

/// The one-line primitives the accessor fragments build on, which name a binding: where the
/// gradient goes (its own binding, or the logits in place), and whether its words (and the
/// logits' 16-bit words) are shared with a neighbouring row and so updated atomically.
fn primitives(key: &ModuleKey) -> String {
    let out = key.gradient_slot();
    let name = out.info().name;
    let mut src = String::new();
    if key.dtype != Dtype::F32 {
        src.push_str(if key.shared_words(Slot::Logits) {
            "fn logit_word(w: u32) -> u32 { return atomicLoad(&logits[w]); }\n"
        } else {
            "fn logit_word(w: u32) -> u32 { return logits[w]; }\n"
        });
    }
    let grad_dtype = if key.in_place {
        key.dtype
    } else {
        key.grad_dtype
    };
    match grad_dtype {
        Dtype::F32 if key.wide => src.push_str(&format!(
            "fn put_lane(j: u32, v: f32) {{ {name}[j >> 2u][j & 3u] = v; }}\n\
             fn put_unit(j: u32, v: vec4<f32>) {{ {name}[j] = v; }}\n"
        )),
        Dtype::F32 => src.push_str(&format!(
            "fn put_f32(j: u32, v: f32) {{ {name}[j] = v; }}\n"
        )),
        Dtype::F16 | Dtype::Bf16 if key.shared_words(out) => src.push_str(&format!(
            "fn put_word(w: u32, bits: u32) {{ atomicStore(&{name}[w], bits); }}\n\
             fn put_half(w: u32, bits: u32, mask: u32) {{ atomicAnd(&{name}[w], ~mask); atomicOr(&{name}[w], bits & mask); }}\n"
        )),
        Dtype::F16 | Dtype::Bf16 => src.push_str(&format!(
            "fn put_word(w: u32, bits: u32) {{ {name}[w] = bits; }}\n\
             fn put_half(w: u32, bits: u32, mask: u32) {{ {name}[w] = ({name}[w] & ~mask) | (bits & mask); }}\n"
        )),
    }
    src
}

#[cfg(test)]
mod tests {
    //! Every module, validated by naga and translated by the back ends wgpu uses: SPIR-V
    //! (Vulkan), MSL (Metal), HLSL (DX12) and GLSL (GL). Needs no adapter.

    use super::*;
    use naga::back::{glsl, hlsl, msl, spv, PipelineConstants};
    use naga::valid::{Capabilities, ValidationFlags, Validator};

    /// Every module key the crate can build: each family, team, dtype pair, gradient placement,
    /// `vec4` choice and word sharing a plan can ask for, at representative sizes (sizes only
    /// change constants). The naga test validates and translates each one for every backend.
    fn every_module_key() -> Vec<ModuleKey> {
        let teams = [
            Team::Workgroup,
            Team::WorkgroupSubgroups(4),
            Team::WorkgroupSubgroups(32),
            Team::Subgroup,
        ];
        let dtypes = [Dtype::F32, Dtype::F16, Dtype::Bf16];
        let mut keys = Vec::new();
        for family in [
            Family::Rows,
            Family::Strided,
            Family::Setup,
            Family::Finalize,
        ] {
            for team in teams {
                // Subgroup teams are row-kernel teams only.
                if team == Team::Subgroup && family != Family::Rows {
                    continue;
                }
                let (wg_size, cache_n) = match (family, team) {
                    (Family::Rows, Team::Subgroup) => (256, 8),
                    (Family::Rows, _) => (256, 32),
                    _ => (AUX_WG_SIZE, 1),
                };
                for dtype in dtypes {
                    for grad_dtype in [dtype, Dtype::F32] {
                        for in_place in [false, true] {
                            if in_place && grad_dtype != dtype {
                                continue;
                            }
                            for wide in [false, true] {
                                if wide && (family != Family::Rows || dtype != Dtype::F32) {
                                    continue;
                                }
                                for private_words in [false, true] {
                                    if private_words && family != Family::Rows {
                                        continue;
                                    }
                                    keys.push(ModuleKey {
                                        family,
                                        wg_size,
                                        cache_n,
                                        team,
                                        in_place,
                                        dtype,
                                        grad_dtype,
                                        wide,
                                        private_words,
                                        head_dtype: Dtype::F32,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        // The linear head: group 0 is the loss's with its f32 chunk (in place), group 1 the
        // head's inputs in each dtype.
        for team in [Team::Workgroup, Team::WorkgroupSubgroups(8)] {
            keys.extend(dtypes.map(|dtype| ModuleKey::linear(dtype, team)));
        }
        keys
    }

    /// The `override` switches of src/kernel.rs (`Switches::constants`), all off, all on, and
    /// each alone: every branch the switches select is compiled at least once.
    fn switch_sets() -> Vec<PipelineConstants> {
        let names = crate::kernel::SWITCH_NAMES;
        let mut sets = Vec::new();
        for on in 0..=names.len() + 1 {
            let mut c = PipelineConstants::default();
            for (i, name) in names.iter().enumerate() {
                // on == 0: all off; 1..=len: switch on-1 alone; len+1: all on.
                let value = on == names.len() + 1 || on == i + 1;
                c.insert((*name).to_string(), f64::from(u8::from(value)));
            }
            sets.push(c);
        }
        sets
    }

    #[test]
    fn every_module_validates_and_translates_for_every_backend() {
        let keys = every_module_key();
        let mut translations = 0;
        for key in &keys {
            let source = compose(key);
            let module = naga::front::wgsl::parse_str(&source)
                .unwrap_or_else(|e| panic!("{key:?}: {}", e.emit_to_string(&source)));
            let subgroups = !matches!(key.team, Team::Workgroup);
            // f16 words are unpacked in f32 (wgpu grants this wherever the downlevel flag
            // SHADER_F16_IN_F32 is set: every native backend).
            let capabilities = Capabilities::SHADER_FLOAT16_IN_FLOAT32
                | if subgroups {
                    Capabilities::SUBGROUP
                } else {
                    Capabilities::empty()
                };
            let info = Validator::new(ValidationFlags::all(), capabilities)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{key:?}: {}", e.emit_to_string(&source)));
            for entry in &module.entry_points {
                let stage = entry.stage;
                for constants in switch_sets() {
                    let what = format!("{key:?} {} {constants:?}", entry.name);
                    let (module, info) = naga::back::pipeline_constants::process_overrides(
                        &module,
                        &info,
                        Some((stage, &entry.name)),
                        &constants,
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    spv::write_vec(
                        &module,
                        &info,
                        &spv::Options::default(),
                        Some(&spv::PipelineOptions {
                            shader_stage: stage,
                            entry_point: entry.name.clone(),
                        }),
                    )
                    .unwrap_or_else(|e| panic!("SPIR-V {what}: {e}"));
                    let entry_point = Some((stage, entry.name.clone()));
                    msl::write_string(
                        &module,
                        &info,
                        &msl::Options {
                            lang_version: (2, 4),
                            ..Default::default()
                        },
                        &msl::PipelineOptions {
                            entry_point: entry_point.clone(),
                            ..Default::default()
                        },
                    )
                    .unwrap_or_else(|e| panic!("MSL {what}: {e}"));
                    let hlsl_options = hlsl::Options {
                        // Wave (subgroup) operations need shader model 6.
                        shader_model: hlsl::ShaderModel::V6_0,
                        ..Default::default()
                    };
                    let hlsl_pipeline = hlsl::PipelineOptions { entry_point };
                    hlsl::Writer::new(String::new(), &hlsl_options, &hlsl_pipeline)
                        .write(&module, &info, None)
                        .unwrap_or_else(|e| panic!("HLSL {what}: {e}"));
                    // wgpu's GL backend offers no subgroup operations: those modules are never
                    // built there.
                    if !subgroups {
                        let glsl_options = glsl::Options::default();
                        let glsl_pipeline = glsl::PipelineOptions {
                            shader_stage: stage,
                            entry_point: entry.name.clone(),
                            multiview: None,
                        };
                        glsl::Writer::new(
                            String::new(),
                            &module,
                            &info,
                            &glsl_options,
                            &glsl_pipeline,
                            naga::proc::BoundsCheckPolicies::default(),
                        )
                        .and_then(|mut w| w.write())
                        .unwrap_or_else(|e| panic!("GLSL {what}: {e}"));
                    }
                    translations += 1;
                }
            }
        }
        println!(
            "{} modules, {translations} entry points x switch sets translated",
            keys.len()
        );
        assert!(keys.len() > 100);
    }
}
