//! Which Burn wgpu devices lsce shares, with their `wgpu::Device`, queue, kernel and plans.
//!
//! Burn's wgpu runtime owns its device and queue and does not hand them out once it runs, so
//! they are taken where cubecl-wgpu documents the way in: the [`WgpuSetup`] that
//! `init_with_setup` returns, or the one the application registers with `init_device`. Each
//! shared device gets one [`LossKernel`] (pipelines compiled once) and a cache of plans, one
//! per [`Problem`] (shape, spec, dtype and buffers present).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::{DispatchDevice, WgpuDevice};
use burn::tensor::wgpu::{MemoryConfiguration, WgpuSetup};
use burn::tensor::Device;
use burn_cubecl::CubeDevice;

use super::error::BurnError;
use crate::linear::{LinearPlan, LinearProblem};
use crate::{LossKernel, LossPlan, Problem};

/// Burn's allocation policy on a device lsce shares: one wgpu buffer per tensor.
///
/// cubecl's default policy carves small tensors out of shared wgpu buffers, and wgpu forbids
/// one buffer bound both read-only (the logits, labels, weights) and writable (the loss and
/// gradient) in one dispatch, which lsce's kernels do (cubecl's own kernels bind everything
/// read-write). Exclusive pages round each allocation up to a size bucket: some memory for
/// never aliasing.
const MEMORY: MemoryConfiguration = MemoryConfiguration::ExclusivePages;

/// Plans kept per device; a training run uses a handful (forward, backward, evaluation).
const PLAN_CACHE: usize = 64;
/// Linear head plans kept per device: fewer, as each owns its scratch (in chunked mode a
/// chunk of logits, up to the caller's budget). A training run uses up to four (forward,
/// backward, evaluation, a last short batch).
const LINEAR_PLAN_CACHE: usize = 8;

/// One device shared by Burn and lsce.
pub(crate) struct Shared {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    kernel: LossKernel,
    /// Most recently used last.
    plans: Mutex<Vec<(Problem, LossPlan)>>,
    /// The same for the fused linear head.
    linear_plans: Mutex<Vec<(LinearProblem, LinearPlan)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("device", &self.device)
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The plan for `problem`, made on first use (which validates it against the device).
    pub(crate) fn plan(&self, problem: &Problem) -> Result<LossPlan, BurnError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = plans.iter().position(|(p, _)| p == problem) {
            let entry = plans.remove(at);
            let plan = entry.1.clone();
            plans.push(entry);
            return Ok(plan);
        }
        let plan = self.kernel.plan(problem)?;
        if plans.len() == PLAN_CACHE {
            plans.remove(0);
        }
        plans.push((*problem, plan.clone()));
        Ok(plan)
    }

    /// The fused linear head's plan for `problem`, made on first use. Launches of one plan
    /// share its scratch: they are recorded and submitted one after another on one queue.
    pub(crate) fn linear_plan(&self, problem: &LinearProblem) -> Result<LinearPlan, BurnError> {
        let mut plans = self.linear_plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = plans.iter().position(|(p, _)| p == problem) {
            let entry = plans.remove(at);
            let plan = entry.1.clone();
            plans.push(entry);
            return Ok(plan);
        }
        let plan = LinearPlan::new(&self.kernel, problem)?;
        if plans.len() == LINEAR_PLAN_CACHE {
            plans.remove(0);
        }
        plans.push((*problem, plan.clone()));
        Ok(plan)
    }
}

fn registry() -> &'static Mutex<HashMap<WgpuDevice, Arc<Shared>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<WgpuDevice, Arc<Shared>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Initialises Burn's wgpu runtime on the default adapter and shares its device with lsce.
///
/// Call it before any tensor is created on the default wgpu device (Burn initialises a runtime
/// once, on first use), and use the returned device, or its `.autodiff()`, for the model.
/// Later calls return the same device.
///
/// ```ignore
/// let device = lsce::burn::init_device()?.autodiff();
/// # Ok::<(), lsce::burn::BurnError>(())
/// ```
pub fn init_device() -> Result<Device, BurnError> {
    static DEFAULT: Mutex<Option<Device>> = Mutex::new(None);
    let mut default = DEFAULT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(device) = default.as_ref() {
        return Ok(device.clone());
    }
    let (device, setup) = Device::wgpu_options()
        .memory_config(MEMORY)
        .init_with_setup()
        .map_err(|e| BurnError::Init(e.to_string()))?;
    register_setup(&device, &setup)?;
    *default = Some(device.clone());
    Ok(device)
}

/// Registers an application's own wgpu setup (instance, adapter, device, queue) with Burn and
/// shares it with lsce: Burn, lsce and the application then record on one device and queue.
pub fn share_setup(setup: WgpuSetup) -> Result<Device, BurnError> {
    let device = Device::wgpu_options()
        .memory_config(MEMORY)
        .setup(setup.clone())
        .init()
        .map_err(|e| BurnError::Init(e.to_string()))?;
    register_setup(&device, &setup)?;
    Ok(device)
}

/// Shares with lsce a Burn wgpu device the application initialised itself, given the setup
/// Burn runs it on (as returned by `Device::wgpu_options().init_with_setup()`). Initialise it
/// with `.memory_config(MemoryConfiguration::ExclusivePages)`: with cubecl's default policy
/// a tensor lsce reads and one it writes can share a wgpu buffer, which the launch refuses.
///
/// The setup must be that device's: Burn does not expose a device's handles, so lsce cannot
/// check the pairing, and a wrong pairing gives wgpu validation errors.
pub fn register_setup(device: &Device, setup: &WgpuSetup) -> Result<(), BurnError> {
    let key = wgpu_device("the device", device)?;
    let kernel = LossKernel::new(&setup.device)?;
    let shared = Arc::new(Shared {
        device: setup.device.clone(),
        queue: setup.queue.clone(),
        kernel,
        plans: Mutex::new(Vec::new()),
        linear_plans: Mutex::new(Vec::new()),
    });
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, shared);
    Ok(())
}

/// The wgpu device behind a Burn device (autodiff or not), or why there is none.
pub(crate) fn wgpu_device(what: &'static str, device: &Device) -> Result<WgpuDevice, BurnError> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(CubeDevice::Wgpu(device)) => Ok(device.clone()),
        _ => Err(BurnError::NotWgpu {
            what,
            device: format!("{device:?}"),
        }),
    }
}

/// The shared state of a Burn device, or why lsce cannot run there.
pub(crate) fn shared(what: &'static str, device: &Device) -> Result<Arc<Shared>, BurnError> {
    let key = wgpu_device(what, device)?;
    shared_for_wgpu(&key).ok_or_else(|| BurnError::DeviceNotShared {
        device: format!("{device:?}"),
    })
}

/// The shared state of a cube tensor's device.
pub(crate) fn shared_for_cube(device: &CubeDevice) -> Option<Arc<Shared>> {
    match device {
        CubeDevice::Wgpu(device) => shared_for_wgpu(device),
        _ => None,
    }
}

fn shared_for_wgpu(device: &WgpuDevice) -> Option<Arc<Shared>> {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(device)
        .cloned()
}
