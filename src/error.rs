//! The one error type of the crate.

use std::fmt;

/// Everything that can go wrong when specifying, planning, encoding or running the loss.
///
/// Each invalid input has its own variant so that callers (and tests) can tell them apart.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LsceError {
    /// A smoothing factor `eps` outside `[0, 1]`, or not a number.
    InvalidSmoothing(f32),
    /// An explicit on/off value that is negative or not finite.
    InvalidTargetValue {
        /// `"on"` or `"off"`.
        which: &'static str,
        /// The value given.
        value: f32,
    },
    /// A scalar parameter of the spec (`z_loss`, `softcap`, `logit_scale`) out of its domain.
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// The value given.
        value: f32,
        /// What the value must be.
        expected: &'static str,
    },
    /// A shape with zero rows, zero classes, or a zero extra dimension.
    EmptyShape,
    /// A shape whose element count overflows the index types (`u32` rows and classes).
    ShapeTooLarge {
        /// What overflowed.
        what: &'static str,
    },
    /// A host slice whose length does not match the shape.
    LengthMismatch {
        /// The argument's name.
        what: &'static str,
        /// Elements expected from the shape.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A class label that is neither in `[0, classes)` nor the ignore index.
    /// Found on the CPU or reported back by the GPU kernel.
    LabelOutOfRange {
        /// The first offending row (flattened `n * spatial + s`).
        row: u64,
        /// Its label.
        label: i32,
        /// The number of classes.
        classes: u32,
    },
    /// An excluded (padding) class that is not a class, or a shape with too few classes for it.
    InvalidExcludedClass {
        /// The excluded class.
        class: u32,
        /// The number of classes.
        classes: u32,
    },
    /// A class weight that is negative or not finite.
    InvalidWeight {
        /// The class.
        class: usize,
        /// Its weight.
        value: f32,
    },
    /// A combination of options this crate does not define (named in the message).
    Unsupported(&'static str),
    /// A buffer is too large for the device's `max_buffer_size`, or one row does not fit a
    /// storage binding.
    ExceedsDeviceLimit {
        /// Which limit.
        limit: &'static str,
        /// Bytes needed.
        needed: u64,
        /// The device's limit.
        available: u64,
    },
    /// A caller buffer lacks a usage flag the kernel needs.
    MissingUsage {
        /// The argument's name.
        what: &'static str,
        /// The usage it needs.
        usage: &'static str,
    },
    /// A caller buffer region is too small for the shape.
    BufferTooSmall {
        /// The argument's name.
        what: &'static str,
        /// Bytes needed from the offset.
        needed: u64,
        /// Bytes available from the offset.
        available: u64,
    },
    /// A caller byte offset that is not aligned to the element size.
    MisalignedOffset {
        /// The argument's name.
        what: &'static str,
        /// The offset given.
        offset: u64,
        /// The alignment required.
        alignment: u64,
    },
    /// A buffer the problem needs was not given (named: `bias`, `d_hidden`, ..).
    MissingBuffer(&'static str),
    /// A buffer was given that the problem does not use (named).
    UnexpectedBuffer(&'static str),
    /// Two caller buffer regions that must not overlap do overlap.
    AliasedBuffers {
        /// The first argument's name.
        first: &'static str,
        /// The second argument's name.
        second: &'static str,
    },
    /// No adapter was found for the requested backends.
    NoAdapter(String),
    /// The adapter refused to create a device.
    RequestDevice(String),
    /// The device reported an error during a call: validation (a buffer of another device, for
    /// one), out of memory, or a lost device.
    Device(String),
    /// Mapping a buffer for readback failed or the device was lost while waiting.
    Readback(String),
    /// Vocabulary shards that do not tile `[0, classes)` exactly: a gap, an overlap, an empty
    /// shard, or a last shard that does not end at `classes`.
    ShardTiling {
        /// The first offending shard (the shard count when the shards stop short).
        shard: usize,
        /// Its class range.
        range: std::ops::Range<u32>,
        /// Where it had to start: the end of the previous shard.
        expected_start: u32,
        /// The global class count.
        classes: u32,
    },
    /// A collective, or a set of record blocks, with another rank count than the layout's.
    RankCount {
        /// Shards in the layout.
        expected: usize,
        /// Ranks (or blocks) given.
        actual: usize,
    },
    /// Shard records that do not belong to this problem's step.
    ForeignRecords {
        /// The shard whose block was rejected.
        shard: usize,
        /// Why.
        reason: &'static str,
    },
    /// A collective transport failed.
    Transport(String),
    /// A rank of a sharded step failed before the records moved, so the step fails on every
    /// rank: the exchange's status round tells each rank which one failed and why, instead of
    /// leaving them waiting for its records.
    RankFailed {
        /// The first failed rank.
        rank: usize,
        /// Its error, as it displays.
        reason: String,
    },
    /// A shard's batch whose shape is not the shard's part of the problem. Shapes are
    /// `[N, classes, spatial]`: the shard's part is `[N, c1 - c0, d1 * .. * dk]`.
    ShardShape {
        /// The shard.
        shard: usize,
        /// The shape its part of the problem has.
        expected: [u32; 3],
        /// The batch's shape.
        actual: [u32; 3],
    },
}

impl fmt::Display for LsceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidSmoothing(eps) => {
                write!(f, "label smoothing eps = {eps} is outside [0, 1]")
            }
            Self::InvalidTargetValue { which, value } => write!(
                f,
                "explicit target {which}-value {value} must be finite and >= 0"
            ),
            Self::InvalidParameter {
                name,
                value,
                expected,
            } => write!(f, "{name} = {value} is invalid: it must be {expected}"),
            Self::EmptyShape => write!(f, "the shape has no elements (zero rows or classes)"),
            Self::ShapeTooLarge { what } => write!(f, "the shape is too large: {what}"),
            Self::LengthMismatch {
                what,
                expected,
                actual,
            } => write!(
                f,
                "{what} has {actual} elements but the shape needs {expected}"
            ),
            Self::LabelOutOfRange {
                row,
                label,
                classes,
            } => write!(
                f,
                "row {row} has label {label}, outside [0, {classes}) and not the ignore index"
            ),
            Self::InvalidExcludedClass { class, classes } => write!(
                f,
                "excluded class {class} needs a shape with at least 2 classes and {class} < {classes}"
            ),
            Self::InvalidWeight { class, value } => write!(
                f,
                "class weight {value} of class {class} must be finite and >= 0"
            ),
            Self::Unsupported(what) => write!(f, "unsupported: {what}"),
            Self::ExceedsDeviceLimit {
                limit,
                needed,
                available,
            } => write!(
                f,
                "{needed} bytes exceed the device limit {limit} = {available}"
            ),
            Self::MissingUsage { what, usage } => {
                write!(f, "buffer {what} lacks BufferUsages::{usage}")
            }
            Self::BufferTooSmall {
                what,
                needed,
                available,
            } => write!(
                f,
                "buffer {what} holds {available} bytes from its offset but {needed} are needed"
            ),
            Self::MisalignedOffset {
                what,
                offset,
                alignment,
            } => write!(
                f,
                "buffer {what} offset {offset} is not a multiple of {alignment}"
            ),
            Self::MissingBuffer(what) => {
                write!(f, "the problem needs a `{what}` buffer, and none was given")
            }
            Self::UnexpectedBuffer(what) => write!(
                f,
                "a `{what}` buffer was given, but the problem does not use one"
            ),
            Self::AliasedBuffers { first, second } => {
                write!(f, "buffers {first} and {second} overlap")
            }
            Self::NoAdapter(msg) => write!(f, "no wgpu adapter found: {msg}"),
            Self::RequestDevice(msg) => write!(f, "requesting a device failed: {msg}"),
            Self::Device(msg) => write!(f, "device error: {msg}"),
            Self::Readback(msg) => write!(f, "readback failed: {msg}"),
            Self::ShardTiling {
                shard,
                range,
                expected_start,
                classes,
            } => write!(
                f,
                "shard {shard} covers classes {range:?} but must start at {expected_start} and \
                 be non-empty; the shards must tile [0, {classes}) without a gap or an overlap"
            ),
            Self::RankCount { expected, actual } => write!(
                f,
                "the layout has {expected} shards but {actual} ranks (or record blocks) were given"
            ),
            Self::ForeignRecords { shard, reason } => {
                write!(f, "shard {shard}'s records are rejected: {reason}")
            }
            Self::Transport(msg) => write!(f, "collective transport failed: {msg}"),
            Self::RankFailed { rank, reason } => {
                write!(f, "rank {rank} failed before the exchange: {reason}")
            }
            Self::ShardShape {
                shard,
                expected,
                actual,
            } => write!(
                f,
                "shard {shard}'s batch has shape [N, classes, spatial] = {actual:?} but its part of \
                 the problem is {expected:?}"
            ),
        }
    }
}

impl std::error::Error for LsceError {}

/// The crate's result type.
pub type Result<T, E = LsceError> = std::result::Result<T, E>;
