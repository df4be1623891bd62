//! The kernel object: the device's capabilities, its bind group layouts and a cache of
//! compiled pipelines, shared by every plan made from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::compose::{self, Family, ModuleKey, Team};
use crate::dtype::Dtype;
use crate::error::{LsceError, Result};
use crate::layout::{HeadSlot, LinearParams, Params, Slot, AUX_WG_SIZE};
use crate::problem::{Gradient, Problem};
use crate::row_kernel::{RowKernel, RowShape};

/// Which switches a pipeline is specialised for (WGSL `override` constants).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Switches {
    pub weights: bool,
    pub soft_targets: bool,
    pub softcap: bool,
    pub write_grad: bool,
    pub accuracy: bool,
}

/// The WGSL `override` names of [`Switches`]' fields, in field order.
pub(crate) const SWITCH_NAMES: [&str; 5] = [
    "HAS_WEIGHTS",
    "SOFT_TARGETS",
    "HAS_SOFTCAP",
    "WRITE_GRAD",
    "ACCURACY",
];

impl Switches {
    fn constants(&self) -> [(&'static str, f64); 5] {
        let values = [
            self.weights,
            self.soft_targets,
            self.softcap,
            self.write_grad,
            self.accuracy,
        ];
        std::array::from_fn(|i| (SWITCH_NAMES[i], f64::from(u8::from(values[i]))))
    }
}

/// Logits per unit: 4 f32 in `vec4` units (`None`), 1 f32, 4 16-bit (two words).
fn logits_per_unit(dtype: Option<Dtype>) -> u32 {
    match dtype {
        Some(Dtype::F32) => 1,
        None | Some(Dtype::F16 | Dtype::Bf16) => 4,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub module: ModuleKey,
    pub entry: &'static str,
    pub switches: Switches,
}

/// How the row kernel is shaped. The defaults come from the adapter; the benchmark sweeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelConfig {
    /// The most invocations per workgroup of the row kernel (a power of two, at most the device
    /// limit); shorter rows get smaller workgroups, about 16 logits per invocation.
    pub row_workgroup: u32,
    /// Logit units (4 logits each, or 1 f32 where a caller's buffers cannot be read as `vec4`)
    /// each invocation keeps in registers, at most: rows of up to `team * row_cache` units are
    /// read once, longer rows twice.
    pub row_cache: u32,
    /// Use subgroup reductions when the device has `Features::SUBGROUP`.
    pub use_subgroups: bool,
    /// Rows of at most this many classes get one subgroup each instead of a workgroup, when the
    /// device has subgroups: no barriers, many rows per workgroup. CPU adapters, where a
    /// barrier switches coroutines, want this for every row length.
    pub subgroup_rows_max_classes: u32,
    /// At most this many workgroups of the row kernel per dispatch, each looping over rows;
    /// `None` launches one per row. Starting a workgroup is cheap on a GPU but costs
    /// microseconds on a CPU adapter, where a few dozen long-lived workgroups are faster.
    pub max_row_workgroups: Option<u32>,
    /// When a plan has fewer rows than this, each long row is split into parts processed by
    /// separate teams (up to about this many teams in all), so that a few rows of a huge
    /// vocabulary still occupy the whole device. 1 disables splitting.
    pub min_row_teams: u32,
}

impl KernelConfig {
    /// The defaults for a device.
    pub fn for_device(device: &wgpu::Device) -> Self {
        let limits = device.limits();
        let cpu = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        Self {
            row_workgroup: 256.min(limits.max_compute_invocations_per_workgroup),
            row_cache: 32,
            use_subgroups: true,
            subgroup_rows_max_classes: if cpu { u32::MAX } else { 2048 },
            max_row_workgroups: cpu.then_some(64),
            // A GPU wants thousands of teams in flight. On a CPU adapter a row per team already
            // keeps every core busy, and the split's extra pass did not pay on lavapipe.
            min_row_teams: if cpu { 1 } else { 1024 },
        }
    }
}

/// Compiled pipelines and layouts for one `wgpu::Device`, built once and shared.
///
/// Pipelines are compiled on first use of a combination (class labels or probabilities,
/// weights, soft-cap, gradient, accuracy) and cached; planning and encoding never compile twice.
/// `LossKernel` is `Send + Sync` and cheap to clone (an `Arc`).
///
/// ```
/// # let (device, _queue) = lsce::request_device(&lsce::DeviceOptions::default()).unwrap();
/// let kernel = lsce::LossKernel::new(&device).unwrap();
/// assert!(kernel.config().row_workgroup.is_power_of_two());
/// ```
#[derive(Clone)]
pub struct LossKernel {
    pub(crate) inner: Arc<KernelInner>,
}

pub(crate) struct KernelInner {
    pub device: wgpu::Device,
    pub config: KernelConfig,
    pub subgroup_min: Option<u32>,
    pub limits: wgpu::Limits,
    layouts: [wgpu::BindGroupLayout; 2],
    pipeline_layouts: [wgpu::PipelineLayout; 2],
    /// The fused linear head's bind group 1 and its pipeline layout (group 0 is the in-place
    /// loss layout), where the device has the storage bindings for both groups.
    head_layouts: Option<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// Bound in place of absent optional inputs (never read: the switches turn them off).
    pub placeholder_read: wgpu::Buffer,
    /// Bound in place of absent optional outputs (never written).
    pub placeholder_write: wgpu::Buffer,
}

impl std::fmt::Debug for LossKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossKernel")
            .field("config", &self.inner.config)
            .field("subgroup_min", &self.inner.subgroup_min)
            .finish_non_exhaustive()
    }
}

impl LossKernel {
    /// Builds the kernel for `device` with the adapter's default [`KernelConfig`].
    pub fn new(device: &wgpu::Device) -> Result<Self> {
        Self::with_config(device, KernelConfig::for_device(device))
    }

    /// Builds the kernel with an explicit configuration.
    pub fn with_config(device: &wgpu::Device, config: KernelConfig) -> Result<Self> {
        let limits = device.limits();
        if !config.row_workgroup.is_power_of_two()
            || config.row_workgroup < 32
            || config.row_workgroup > limits.max_compute_invocations_per_workgroup
            || config.row_workgroup > limits.max_compute_workgroup_size_x
        {
            return Err(LsceError::InvalidParameter {
                name: "row_workgroup",
                value: config.row_workgroup as f32,
                expected: "a power of two in [32, the device's workgroup limit]",
            });
        }
        if config.min_row_teams == 0 {
            return Err(LsceError::InvalidParameter {
                name: "min_row_teams",
                value: 0.0,
                expected: "at least 1",
            });
        }
        if config.row_cache == 0 || config.row_cache > 256 {
            return Err(LsceError::InvalidParameter {
                name: "row_cache",
                value: config.row_cache as f32,
                expected: "in [1, 256]",
            });
        }
        if limits.max_storage_buffers_per_shader_stage < Slot::ALL.len() as u32 {
            return Err(LsceError::ExceedsDeviceLimit {
                limit: "max_storage_buffers_per_shader_stage",
                needed: Slot::ALL.len() as u64,
                available: u64::from(limits.max_storage_buffers_per_shader_stage),
            });
        }
        let subgroup_min = (config.use_subgroups
            && device.features().contains(wgpu::Features::SUBGROUP))
        .then(|| device.adapter_info().subgroup_min_size.max(1));
        let layouts = [false, true].map(|in_place| bind_group_layout(device, in_place));
        let pipeline_layouts = [0, 1].map(|i| {
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("lsce"),
                bind_group_layouts: &[Some(&layouts[i])],
                immediate_size: 0,
            })
        });
        let head_layouts = (limits.max_storage_buffers_per_shader_stage >= head_storage_bindings())
            .then(|| {
                let head = head_bind_group_layout(device);
                let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("lsce linear head"),
                    bind_group_layouts: &[Some(&layouts[1]), Some(&head)],
                    immediate_size: 0,
                });
                (head, pipeline)
            });
        let placeholder = |usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("lsce placeholder"),
                size: 256,
                usage,
                mapped_at_creation: false,
            })
        };
        Ok(Self {
            inner: Arc::new(KernelInner {
                device: device.clone(),
                config,
                subgroup_min,
                limits,
                layouts,
                pipeline_layouts,
                head_layouts,
                modules: Mutex::default(),
                pipelines: Mutex::default(),
                placeholder_read: placeholder(wgpu::BufferUsages::STORAGE),
                placeholder_write: placeholder(wgpu::BufferUsages::STORAGE),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> KernelConfig {
        self.inner.config
    }

    /// Whether the reductions use subgroup operations on this device.
    pub fn uses_subgroups(&self) -> bool {
        self.inner.subgroup_min.is_some()
    }

    /// The device the kernel was built for.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }
}

impl KernelInner {
    pub fn layout(&self, in_place: bool) -> &wgpu::BindGroupLayout {
        &self.layouts[usize::from(in_place)]
    }

    /// The fused linear head's bind group 1 layout, or the limit the device lacks for it.
    pub fn head_layout(&self) -> Result<&wgpu::BindGroupLayout> {
        self.head_layouts
            .as_ref()
            .map(|(layout, _)| layout)
            .ok_or(LsceError::ExceedsDeviceLimit {
                limit: "max_storage_buffers_per_shader_stage",
                needed: u64::from(head_storage_bindings()),
                available: u64::from(self.limits.max_storage_buffers_per_shader_stage),
            })
    }

    /// How the row kernel is shaped for rows of `classes` logits of `dtype`: its team and
    /// workgroup size, and how many rows one workgroup takes at a time.
    ///
    /// A subgroup per row where the device has subgroups and rows are short (see
    /// [`KernelConfig::subgroup_rows_max_classes`]); otherwise a workgroup per row with enough
    /// invocations that each handles about `UNITS_PER_INVOCATION` units, a power of two between
    /// 32 and the configured maximum, so that short rows leave no invocation idle.
    /// `dtype` is the logits' type, `None` for f32 in `vec4` units. With subgroup teams, a
    /// workgroup holds up to 8 of them, fewer when rows are few, so that at least
    /// `MIN_WORKGROUPS` workgroups share the device.
    pub fn row_shape(&self, rows: u32, classes: u32, dtype: Option<Dtype>) -> RowShape {
        const UNITS_PER_INVOCATION: u32 = 16;
        const TEAMS_PER_WORKGROUP: u32 = 8;
        const MIN_WORKGROUPS: u32 = 16;
        let max = self.config.row_workgroup;
        match self.subgroup_min {
            Some(subgroup) if classes <= self.config.subgroup_rows_max_classes => {
                let teams = (rows / MIN_WORKGROUPS)
                    .clamp(1, TEAMS_PER_WORKGROUP)
                    .next_power_of_two();
                let workgroup = (teams * subgroup).clamp(subgroup, max.max(subgroup));
                let units = classes.div_ceil(logits_per_unit(dtype)) + 1;
                RowShape {
                    team: Team::Subgroup,
                    workgroup,
                    rows_per_workgroup: (workgroup / subgroup).max(1),
                    cache: self.cache_slots(units, subgroup),
                    team_size: subgroup,
                    units,
                }
            }
            subgroups => {
                let units = classes.div_ceil(logits_per_unit(dtype)) + 1;
                let workgroup = units
                    .div_ceil(UNITS_PER_INVOCATION)
                    .next_power_of_two()
                    .clamp(32.min(max), max);
                RowShape {
                    team: subgroups.map_or(Team::Workgroup, Team::WorkgroupSubgroups),
                    workgroup,
                    rows_per_workgroup: 1,
                    cache: self.cache_slots(units, workgroup),
                    team_size: workgroup,
                    units,
                }
            }
        }
    }

    /// Register slots per invocation for rows of `units` units over `team` invocations: the
    /// configured cache, or fewer (a power of two) when the row needs fewer, since every slot
    /// costs registers (and, on CPU adapters, memory traffic) whether used or not.
    fn cache_slots(&self, units: u32, team: u32) -> u32 {
        units
            .div_ceil(team)
            .next_power_of_two()
            .min(self.config.row_cache)
    }

    /// The team of the setup and reduction passes: the whole workgroup.
    pub fn workgroup_team(&self) -> Team {
        self.subgroup_min
            .map_or(Team::Workgroup, Team::WorkgroupSubgroups)
    }

    /// The module of `family` for a plan's data: its row kernel, and the problem's gradient
    /// placement, dtypes and class count; `wide` asks for f32 `vec4` units.
    pub fn module_key(
        &self,
        family: Family,
        row_kernel: RowKernel,
        problem: &Problem,
        wide: bool,
    ) -> ModuleKey {
        let dtype = problem.dtype;
        let (wg_size, cache_n, team) = match (family, row_kernel) {
            (Family::Rows, RowKernel::Teams { shape, .. }) => {
                (shape.workgroup, shape.cache, shape.team)
            }
            _ => (AUX_WG_SIZE, 1, self.workgroup_team()),
        };
        ModuleKey {
            family,
            wg_size,
            cache_n,
            team,
            in_place: problem.gradient == Gradient::InPlace,
            dtype,
            grad_dtype: problem.grad_dtype(),
            wide: wide && family == Family::Rows && dtype == Dtype::F32,
            // Offsets are multiples of 4 bytes, so with an even class count every row starts
            // on a word boundary. The strided kernel's neighbouring rows share words.
            private_words: family == Family::Rows && problem.shape.classes().is_multiple_of(2),
            head_dtype: Dtype::F32,
        }
    }

    /// The pipeline for `key`, compiled on first use. Compilation errors (which would be bugs)
    /// come back as `Err` rather than through the device's uncaptured-error handler.
    pub fn pipeline(&self, key: PipelineKey) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.pipelines.lock().expect("pipeline cache").get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut modules = self.modules.lock().expect("module cache");
            modules
                .entry(key.module)
                .or_insert_with(|| {
                    self.device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some("lsce"),
                            source: wgpu::ShaderSource::Wgsl(compose::compose(&key.module).into()),
                        })
                })
                .clone()
        };
        let constants = key.switches.constants();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: Some(match (key.module.family, &self.head_layouts) {
                    (Family::Linear, Some((_, layout))) => layout,
                    _ => &self.pipeline_layouts[usize::from(key.module.in_place)],
                }),
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            self.modules
                .lock()
                .expect("module cache")
                .remove(&key.module);
            return Err(LsceError::Device(format!("compiling {}: {err}", key.entry)));
        }
        self.pipelines
            .lock()
            .expect("pipeline cache")
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }
}

/// Storage bindings of a linear head pipeline: the loss's group 0 and the head's group 1.
fn head_storage_bindings() -> u32 {
    (Slot::ALL.len() + HeadSlot::ALL.len()) as u32
}

/// Bind group 1 of the fused linear head: its parameters (`LinearParams`, dynamic offset per
/// step) and the slots of `HeadSlot`.
fn head_bind_group_layout(device: &wgpu::Device) -> wgpu::BindGroupLayout {
    group_layout(
        device,
        "lsce linear head",
        std::mem::size_of::<LinearParams>(),
        HeadSlot::ALL.map(|slot| (slot.binding(), slot.info().1)),
    )
}

fn bind_group_layout(device: &wgpu::Device, in_place: bool) -> wgpu::BindGroupLayout {
    group_layout(
        device,
        if in_place { "lsce in-place" } else { "lsce" },
        std::mem::size_of::<Params>(),
        Slot::ALL.map(|slot| (slot.binding(), slot.writable(in_place))),
    )
}

/// A bind group layout: a uniform of `uniform_bytes` with a dynamic offset at binding 0, then
/// storage buffers `(binding, writable)`.
fn group_layout<const N: usize>(
    device: &wgpu::Device,
    label: &str,
    uniform_bytes: usize,
    storage: [(u32, bool); N],
) -> wgpu::BindGroupLayout {
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: wgpu::BufferSize::new(uniform_bytes as u64),
        },
        count: None,
    }];
    entries.extend(
        storage.map(|(binding, writable)| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: !writable,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }),
    );
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}
