//! Every data layout that Rust and WGSL share, declared once, here, and emitted into the
//! generated prelude of every module ([`wgsl_declarations`]): the parameter struct, the words
//! of the `control` scratch buffer (the summary, the partial slots of the setup and reduction
//! passes, the split-row records), the binding slots, and the codes of the parameter fields.
//! No shader spells a word offset or a field list of its own.

use bytemuck::Pod;

use crate::error::{LsceError, Result};
use crate::spec::Reduction;

/// A scalar type a shared struct may hold, and its WGSL name.
pub(crate) trait WgslScalar: Pod {
    const WGSL: &'static str;
}

impl WgslScalar for u32 {
    const WGSL: &'static str = "u32";
}

impl WgslScalar for i32 {
    const WGSL: &'static str = "i32";
}

impl WgslScalar for f32 {
    const WGSL: &'static str = "f32";
}

/// One field of a shared struct: its name, WGSL type and position in 32-bit words.
pub(crate) struct Field {
    pub name: &'static str,
    pub wgsl: &'static str,
    pub word: usize,
}

/// A `#[repr(C)]` struct of 32-bit scalars whose layout WGSL sees too.
pub(crate) trait SharedLayout: Pod {
    /// The prefix of its word constants (`SUMMARY` gives `SUMMARY_LOSS`, `SUMMARY_WORDS`), or
    /// its struct name when WGSL declares it as a struct.
    const WGSL_NAME: &'static str;
    /// Its fields in memory order.
    const FIELDS: &'static [Field];
    /// Its size in 32-bit words.
    const WORDS: u64 = (std::mem::size_of::<Self>() / 4) as u64;
}

/// Declares a `#[repr(C)]` struct of 32-bit scalars and its [`SharedLayout`]: the one
/// declaration that both the Rust struct and the WGSL declarations come from.
macro_rules! shared_layout {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident as $wgsl:literal {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $crate::layout::SharedLayout for $name {
            const WGSL_NAME: &'static str = $wgsl;
            const FIELDS: &'static [$crate::layout::Field] = &[$(
                $crate::layout::Field {
                    name: stringify!($field),
                    wgsl: <$ty as $crate::layout::WgslScalar>::WGSL,
                    word: std::mem::offset_of!($name, $field) / 4,
                },
            )*];
        }
    };
}

shared_layout! {
    /// Per-window parameters, the uniform `P` (copied into the private `Q` by `load_params`).
    pub(crate) struct Params as "Params" {
        pub classes: u32,
        pub spatial: u32,
        /// Rows in this window.
        pub row_count: u32,
        /// Global index of the window's first row.
        pub row_begin: u32,
        /// Element offset of the window's first logit in `logits`.
        pub logits_base: u32,
        /// Word offset of the window's first target in `targets`.
        pub targets_base: u32,
        /// Word offset of the window's first upstream value (per-row mode).
        pub upstream_base: u32,
        /// Word offset of the window's first row in `row_loss`.
        pub loss_base: u32,
        /// Word offset of the window's first row in `lse`.
        pub lse_base: u32,
        /// Element offset of the window's first gradient value in `grad` (in place: in
        /// `logits`).
        pub grad_base: u32,
        /// Word offset of class 0 in `weights`.
        pub weights_base: u32,
        /// First partial slot of this window.
        pub chunk_base: u32,
        /// Partial slots of all windows together.
        pub chunk_count: u32,
        /// The class that receives no smoothing mass, or `NONE_U32`.
        pub excluded: u32,
        pub ignore_index: i32,
        pub has_ignore: u32,
        /// A `REDUCTION_*` code.
        pub reduction: u32,
        /// An `UPSTREAM_*` code.
        pub upstream_mode: u32,
        /// Rows of all windows together.
        pub total_rows: u32,
        /// Target value at the label.
        pub on: f32,
        /// Target value at every other receiving class.
        pub off: f32,
        /// `off * receiving classes`: the off-mass of an unweighted row.
        pub off_mass: f32,
        pub logit_scale: f32,
        /// 0 when soft-capping is off.
        pub softcap: f32,
        pub z_loss: f32,
        /// First word of the split-row records in `control`.
        pub split_base: u32,
        /// Parts per row when rows are split (rows.wgsl); the shard count `P` of a
        /// device-merging shard plan (src/shards); else 1.
        pub split_parts: u32,
        /// A vocabulary shard's first global class `c0` (src/shards), else 0.
        pub class_begin: u32,
        /// The class count labels index: the global `K` of a vocabulary shard, else `classes`.
        pub label_classes: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

shared_layout! {
    /// The 32-byte summary every encode writes to [`LossBuffers::summary`](crate::LossBuffers):
    /// the first words of `control`, copied out after the passes.
    ///
    /// Valid once the command buffer has executed. Check it with [`Summary::check`]: a label
    /// outside `[0, classes)` that is not the ignore index is reported here (its row's loss and
    /// gradient are NaN), never clamped.
    pub struct Summary as "SUMMARY" {
        /// The reduced loss (`Sum`/`Mean`), z-loss included; 0 for `Reduction::None`.
        pub loss: f32,
        /// The z-loss part of `loss`; 0 for `Reduction::None`.
        pub z_loss: f32,
        /// The mean's denominator (see [`LossOutput::denominator`](crate::LossOutput)).
        pub denominator: f32,
        /// Non-ignored rows whose argmax is the label, when accuracy was asked for.
        pub correct: u32,
        /// The first row with an invalid label, or `u32::MAX`.
        pub first_bad_row: u32,
        /// That row's label.
        pub bad_label: i32,
        /// Rows that were not ignored (all rows for probability targets).
        pub counted_rows: u32,
        /// Reserved, 0.
        pub reserved: u32,
    }
}

impl Summary {
    /// Size in bytes.
    pub const SIZE: u64 = std::mem::size_of::<Summary>() as u64;

    /// Reads a summary from the bytes of a mapped buffer (at least [`Summary::SIZE`] bytes, any
    /// alignment).
    ///
    /// ```
    /// let bytes = [0u8; 32];
    /// assert_eq!(lsce::Summary::from_bytes(&bytes).loss, 0.0);
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Self {
        bytemuck::pod_read_unaligned(&bytes[..Self::SIZE as usize])
    }

    /// `Err(LabelOutOfRange)` if the kernel found an invalid label.
    pub fn check(&self, classes: u32) -> Result<()> {
        if self.first_bad_row != u32::MAX {
            return Err(LsceError::LabelOutOfRange {
                row: u64::from(self.first_bad_row),
                label: self.bad_label,
                classes,
            });
        }
        Ok(())
    }
}

shared_layout! {
    /// What `setup_partials` writes per chunk of `CHUNK_ROWS` rows into its partial slot.
    #[allow(dead_code)] // written and read by the shaders only
    pub(crate) struct SetupPartial as "SETUP_PARTIAL" {
        /// Sum of the labels' weights (the count without weights).
        denominator: f32,
        /// Non-ignored rows.
        counted_rows: u32,
        /// The chunk's first row with an invalid label, or `NONE_U32`.
        first_bad_row: u32,
        /// That row's label.
        bad_label: i32,
    }
}

shared_layout! {
    /// What `finalize_partials` writes per chunk of `CHUNK_ROWS` rows into its partial slot.
    #[allow(dead_code)] // written and read by the shaders only
    pub(crate) struct FinalizePartial as "FINALIZE_PARTIAL" {
        loss: f32,
        z_loss: f32,
    }
}

shared_layout! {
    /// One part of a split row (rows.wgsl): `split_stats` writes its statistics, `split_finish`
    /// merges a row's parts in order and leaves the gradient constants in part 0's record.
    #[allow(dead_code)] // written and read by the shaders only
    pub(crate) struct SplitRecord as "SPLIT" {
        /// The part's running max.
        max: f32,
        /// `sum exp(z - max)` over the part.
        sum_exp: f32,
        /// The part's target sum relative to its max, `sum_c b_c (max - z_c)` (`add_target` in
        /// common.wgsl: `b_c = a_c`, or `w_c` at a class label's receiving classes).
        shifted: f32,
        /// That sum's mass `sum_c b_c`, which lifts it to the row's max when parts merge.
        mass: f32,
        /// Bits of the part's largest raw logit.
        argmax_value: u32,
        /// Its class (the first one on ties), or `NONE_U32`.
        argmax_class: u32,
        /// Part 0 after `split_finish`: `(A + 2 z_loss lse) / s`, which multiplies
        /// `exp(z - max)` in the gradient (`grad_consts` in common.wgsl).
        grad_ez_coef: f32,
        /// Part 0 after `split_finish`: the row's gradient scale times the logit scale.
        grad_scale: f32,
    }
}

shared_layout! {
    /// The header of a vocabulary shard's record block (src/shards/record.rs): what names the
    /// problem and the shard, and the shard's part of the mean's denominator.
    pub(crate) struct ShardHeader as "SHARD_HEADER" {
        /// [`SHARD_MAGIC`].
        pub magic: u32,
        /// The low half of the problem's fingerprint.
        pub fingerprint_lo: u32,
        /// Its high half.
        pub fingerprint_hi: u32,
        /// The shard's index (rank) `p`.
        pub shard: u32,
        /// The shard count `P`.
        pub shards: u32,
        /// Rows.
        pub rows: u32,
        /// The shard's first class `c0`.
        pub class_begin: u32,
        /// `sum w_y` over the valid rows whose label the shard holds (the setup pass's
        /// `SUMMARY_DENOMINATOR`, copied in by the host).
        pub denominator: f32,
    }
}

/// The first word of every shard record block: "LSCS".
pub(crate) const SHARD_MAGIC: u32 = 0x5343_534c;

shared_layout! {
    /// One row's partial statistics over one vocabulary shard (`shard_stats` in rows.wgsl;
    /// src/shards/record.rs), every sum over the shard's classes `c` with transformed logits `z`.
    pub(crate) struct ShardRecord as "SHARD_RECORD" {
        /// `m = max_c z_c` (the most negative finite f32 when all are `-inf`).
        pub max: f32,
        /// `sum_c exp(z_c - m)`.
        pub sum_exp: f32,
        /// `sum_c a_c (m - z_c)`.
        pub shifted: f32,
        /// `sum_c a_c`.
        pub mass: f32,
        /// Bits of the first largest raw logit (with accuracy; `-inf` otherwise).
        pub argmax_value: u32,
        /// Its global class, or `NONE_U32`.
        pub argmax_class: u32,
        /// The row's class label (0 for probability targets).
        pub label: i32,
        /// The row kind (`ROW_*`), plus `SHARD_HOLDS_LABEL` when the shard holds the label.
        pub flags: u32,
    }
}

/// Bit of [`ShardRecord::flags`]: the shard holds the row's label.
pub(crate) const SHARD_HOLDS_LABEL: u32 = 4;
/// Bits of [`ShardRecord::flags`] holding the row kind.
pub(crate) const SHARD_KIND_MASK: u32 = 3;

shared_layout! {
    /// What pass 2 of a vocabulary shard needs of a row after a host merge (`shard_grad` in
    /// rows.wgsl; `RowGrad` in src/shards/merge.rs).
    pub(crate) struct ShardMergedRow as "SHARD_MERGED" {
        /// `M`: the row's global max.
        pub max: f32,
        /// `(A + 2 z_loss lse) / S`: the factor of `exp(z - M)`.
        pub coef: f32,
        /// The row's gradient scale (upstream, over the denominator for the mean).
        pub scale: f32,
        /// The row kind (`ROW_*`).
        pub kind: u32,
    }
}

shared_layout! {
    /// Per-dispatch parameters of the fused linear head (linear.wgsl, matmul.wgsl; src/linear),
    /// the uniform `LP` of its bind group 1 (copied into the private `LQ`). Dimensions are
    /// element counts; rows are global row indices.
    pub(crate) struct LinearParams as "LinearParams" {
        /// `N`: rows of the hidden states (and of the problem).
        pub rows: u32,
        /// `D`: the hidden size, the depth of the logits' matmul.
        pub dim: u32,
        /// `V`: the vocabulary (classes).
        pub vocab: u32,
        /// The first row this dispatch covers.
        pub row_begin: u32,
        /// Rows this dispatch covers.
        pub row_count: u32,
        /// The vocabulary range `linear_grad_hidden` walks in this dispatch: from here..
        pub vocab_begin: u32,
        /// ..to here.
        pub vocab_end: u32,
        /// The first row of the chunk whose logits `logits` holds (chunked mode).
        pub chunk_begin: u32,
        /// The vocabulary window bound in group 1 (`head`, `bias`, `d_head`, `d_bias` hold its
        /// entries from 0): its first entry..
        pub window_begin: u32,
        /// ..and its end.
        pub window_end: u32,
        /// The window's first vocabulary block (`linear_stats` runs over the window's blocks).
        pub block_begin: u32,
        /// Vocabulary tiles per block: a block is one `ShardRecord` per row.
        pub block_tiles: u32,
        /// 1 when a bias is bound.
        pub has_bias: u32,
        /// 1: the gradient passes recompute the logits; 0: they read G from the chunk.
        pub recompute: u32,
        /// 1: `linear_stats` also writes the chunk's logits (chunked mode).
        pub store_logits: u32,
        /// First word of the merged rows (`ShardMergedRow`) in `control`.
        pub merged_base: u32,
        /// 1 when `d_bias` is written.
        pub bias_grad: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
        pub _pad3: u32,
        pub _pad4: u32,
    }
}

/// A storage binding of the fused linear head's bind group 1 (after its uniform `LP` at
/// binding 0), by what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeadSlot {
    Hidden,
    Head,
    Bias,
    DHidden,
    DHead,
    DBias,
}

impl HeadSlot {
    /// Every slot in binding order.
    pub const ALL: [HeadSlot; 6] = [
        HeadSlot::Hidden,
        HeadSlot::Head,
        HeadSlot::Bias,
        HeadSlot::DHidden,
        HeadSlot::DHead,
        HeadSlot::DBias,
    ];

    /// Its `@binding` number in group 1.
    pub fn binding(self) -> u32 {
        self as u32 + 1
    }

    /// The WGSL variable, and whether the kernels write it.
    pub fn info(self) -> (&'static str, bool) {
        match self {
            HeadSlot::Hidden => ("hidden", false),
            HeadSlot::Head => ("head", false),
            HeadSlot::Bias => ("bias", false),
            HeadSlot::DHidden => ("d_hidden", true),
            HeadSlot::DHead => ("d_head", true),
            HeadSlot::DBias => ("d_bias", true),
        }
    }
}

/// What a row is, from its label: the codes of `ROW_*` in the shaders and of a shard record's
/// kind bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// Its loss and gradient are computed.
    Valid = 0,
    /// Its label is the ignore index: loss 0, gradient 0.
    Ignored = 1,
    /// Its label is outside `[0, K)`: loss and gradient NaN, reported.
    BadLabel = 2,
}

impl RowKind {
    /// The kind of a code, if it is one.
    pub(crate) fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::Valid),
            1 => Some(Self::Ignored),
            2 => Some(Self::BadLabel),
            _ => None,
        }
    }
}

/// Words of a partial slot: the larger of the two kinds.
pub(crate) const PARTIAL_WORDS: u64 = if SetupPartial::WORDS > FinalizePartial::WORDS {
    SetupPartial::WORDS
} else {
    FinalizePartial::WORDS
};

/// Word of `control` holding the weighted off-mass, after the summary.
pub(crate) const CONTROL_OFF_MASS: u64 = Summary::WORDS;
/// Words of `control` before the partial slots (the summary, the off-mass, room to spare).
pub(crate) const CONTROL_HEADER_WORDS: u64 = 16;
const _: () = assert!(CONTROL_OFF_MASS < CONTROL_HEADER_WORDS);

/// Rows per partial slot of the setup and reduction passes.
pub(crate) const CHUNK_ROWS: u32 = 1024;
/// Workgroup size of the setup and reduction passes and of the strided kernel.
pub(crate) const AUX_WG_SIZE: u32 = 256;

/// The code of a reduction in [`Params::reduction`].
pub(crate) fn reduction_code(reduction: Reduction) -> u32 {
    match reduction {
        Reduction::None => 0,
        Reduction::Sum => 1,
        Reduction::Mean => 2,
    }
}

/// Where the upstream gradient comes from ([`Params::upstream_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamMode {
    /// No buffer: 1.
    One = 0,
    /// One value for the reduced loss.
    Scalar = 1,
    /// One value per row.
    PerRow = 2,
}

/// The constants every module is given, by WGSL name.
fn constants() -> Vec<(String, u32)> {
    let mut list = vec![
        ("CHUNK_ROWS".to_string(), CHUNK_ROWS),
        ("CTRL_OFF_MASS".to_string(), CONTROL_OFF_MASS as u32),
        ("CTRL_PARTIALS".to_string(), CONTROL_HEADER_WORDS as u32),
        ("PARTIAL_WORDS".to_string(), PARTIAL_WORDS as u32),
    ];
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let name = format!("{reduction:?}").to_uppercase();
        list.push((format!("REDUCTION_{name}"), reduction_code(reduction)));
    }
    for (name, mode) in [
        ("ONE", UpstreamMode::One),
        ("SCALAR", UpstreamMode::Scalar),
        ("PER_ROW", UpstreamMode::PerRow),
    ] {
        list.push((format!("UPSTREAM_{name}"), mode as u32));
    }
    list.extend(word_constants::<Summary>());
    list.extend(word_constants::<SetupPartial>());
    list.extend(word_constants::<FinalizePartial>());
    list.extend(word_constants::<SplitRecord>());
    list.extend(word_constants::<ShardHeader>());
    list.extend(word_constants::<ShardRecord>());
    list.extend(word_constants::<ShardMergedRow>());
    list.push(("SHARD_HOLDS_LABEL".to_string(), SHARD_HOLDS_LABEL));
    list.push(("SHARD_KIND_MASK".to_string(), SHARD_KIND_MASK));
    for kind in [RowKind::Valid, RowKind::Ignored, RowKind::BadLabel] {
        let name = match kind {
            RowKind::Valid => "VALID",
            RowKind::Ignored => "IGNORED",
            RowKind::BadLabel => "BAD_LABEL",
        };
        list.push((format!("ROW_{name}"), kind as u32));
    }
    list
}

/// `PREFIX_FIELD` for each field's word and `PREFIX_WORDS` for the size, of a record kept in
/// `u32` words.
fn word_constants<T: SharedLayout>() -> Vec<(String, u32)> {
    let prefix = T::WGSL_NAME;
    let mut list: Vec<_> = T::FIELDS
        .iter()
        .map(|f| (format!("{prefix}_{}", f.name.to_uppercase()), f.word as u32))
        .collect();
    list.push((format!("{prefix}_WORDS"), T::WORDS as u32));
    list
}

/// `struct Name { field: type, .. }` of a layout WGSL declares as a struct.
fn wgsl_struct<T: SharedLayout>() -> String {
    let mut src = format!("struct {} {{\n", T::WGSL_NAME);
    for f in T::FIELDS {
        src.push_str(&format!("    {}: {},\n", f.name, f.wgsl));
    }
    src.push_str("}\n");
    src
}

/// The WGSL declarations of every shared layout: `struct Params` and the word constants.
pub(crate) fn wgsl_declarations() -> String {
    let mut src = wgsl_struct::<Params>();
    src.push_str(&wgsl_struct::<LinearParams>());
    for (name, value) in constants() {
        src.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    src
}

/// A storage binding of group 0 (after the uniform `P` at binding 0), by what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Logits,
    Targets,
    Weights,
    Upstream,
    RowLoss,
    Lse,
    Grad,
    Control,
}

/// How a binding is indexed, which decides the part of it a row window binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Indexing {
    /// By logit element: a window binds its items' elements.
    Elements,
    /// By row (class labels, per-row upstream, per-row outputs); probability targets are
    /// indexed like the logits and a single value is bound whole.
    Rows,
    /// Bound whole.
    Whole,
}

/// What a binding holds, how WGSL declares it, and how a window binds it.
pub(crate) struct Binding {
    /// The WGSL variable.
    pub name: &'static str,
    /// The `LossBuffers` field (or plan scratch) bound there, as errors name it.
    pub arg: &'static str,
    /// Its WGSL type, unless the plan's dtypes change it (see `compose::binding_type`).
    pub wgsl: &'static str,
    pub writable: bool,
    pub indexing: Indexing,
}

impl Slot {
    /// Every slot in binding order.
    pub const ALL: [Slot; 8] = [
        Slot::Logits,
        Slot::Targets,
        Slot::Weights,
        Slot::Upstream,
        Slot::RowLoss,
        Slot::Lse,
        Slot::Grad,
        Slot::Control,
    ];

    /// Its `@binding` number.
    pub fn binding(self) -> u32 {
        self as u32 + 1
    }

    /// Its description.
    pub fn info(self) -> Binding {
        let (name, arg, wgsl, writable, indexing) = match self {
            Slot::Logits => ("logits", "logits", "array<f32>", false, Indexing::Elements),
            Slot::Targets => ("targets", "targets", "array<u32>", false, Indexing::Rows),
            Slot::Weights => ("weights", "weights", "array<f32>", false, Indexing::Whole),
            Slot::Upstream => ("upstream", "upstream", "array<f32>", false, Indexing::Rows),
            Slot::RowLoss => ("row_loss", "loss", "array<f32>", true, Indexing::Rows),
            Slot::Lse => ("lse", "lse", "array<f32>", true, Indexing::Rows),
            Slot::Grad => ("grad", "grad", "array<f32>", true, Indexing::Elements),
            Slot::Control => (
                "control",
                "scratch",
                "array<atomic<u32>>",
                true,
                Indexing::Whole,
            ),
        };
        Binding {
            name,
            arg,
            wgsl,
            writable,
            indexing,
        }
    }

    /// Whether the slot is writable; the logits are when the gradient overwrites them.
    pub fn writable(self, in_place: bool) -> bool {
        self.info().writable || (self == Slot::Logits && in_place)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_the_rust_structs() {
        assert_eq!(Summary::WORDS * 4, Summary::SIZE);
        assert_eq!(Params::FIELDS.len() as u64, Params::WORDS);
        let c = constants();
        let get = |n: &str| c.iter().find(|(name, _)| name == n).map(|(_, v)| *v);
        assert_eq!(get("SUMMARY_CORRECT"), Some(3));
        assert_eq!(get("SPLIT_ARGMAX_CLASS"), Some(5));
        assert_eq!(get("SPLIT_WORDS"), Some(8));
        assert_eq!(get("PARTIAL_WORDS"), Some(4));
        assert_eq!(get("REDUCTION_MEAN"), Some(2));
        assert!(wgsl_declarations().contains("    split_parts: u32,\n"));
    }
}
