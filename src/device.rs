//! A device helper for users without an engine: pick an adapter, request its full limits and
//! the optional features the kernels can use.

use crate::error::{LsceError, Result};

/// Optional features the kernels use when the adapter has them.
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::SUBGROUP
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);

/// How [`request_device`] picks an adapter.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Backends to consider. Default: `WGPU_BACKEND` from the environment, else all.
    pub backends: wgpu::Backends,
    /// A case-insensitive substring of the adapter's name. Default: `WGPU_ADAPTER_NAME`.
    pub adapter_name: Option<String>,
    /// Preference between integrated and discrete GPUs.
    pub power_preference: wgpu::PowerPreference,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all()),
            adapter_name: std::env::var("WGPU_ADAPTER_NAME").ok(),
            power_preference: wgpu::PowerPreference::HighPerformance,
        }
    }
}

/// Every adapter of the given backends, in wgpu's order.
pub fn adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    pollster::block_on(instance.enumerate_adapters(backends))
}

/// Picks an adapter and creates a device with its limits and the [`OPTIONAL_FEATURES`] it has.
///
/// ```
/// let (device, _queue) = lsce::request_device(&lsce::DeviceOptions::default()).unwrap();
/// println!("{}", device.adapter_info().name);
/// ```
pub fn request_device(options: &DeviceOptions) -> Result<(wgpu::Device, wgpu::Queue)> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: options.backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = match &options.adapter_name {
        Some(name) => {
            let name = name.to_lowercase();
            pollster::block_on(instance.enumerate_adapters(options.backends))
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&name))
                .ok_or_else(|| LsceError::NoAdapter(format!("no adapter name contains {name:?}")))?
        }
        None => pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: options.power_preference,
            ..Default::default()
        }))
        .map_err(|e| {
            LsceError::NoAdapter(format!(
                "{e} (backends {:?}); on a machine without a GPU install a software driver, \
                 e.g. `apt-get install mesa-vulkan-drivers`",
                options.backends
            ))
        })?,
    };
    device_for_adapter(&adapter)
}

/// Creates a device on `adapter` with the adapter's own limits (a default descriptor would get
/// WebGPU's lower defaults) and the [`OPTIONAL_FEATURES`] it has.
pub fn device_for_adapter(adapter: &wgpu::Adapter) -> Result<(wgpu::Device, wgpu::Queue)> {
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("lsce"),
        required_features: adapter.features() & OPTIONAL_FEATURES,
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .map_err(|e| LsceError::RequestDevice(e.to_string()))
}

/// An uninitialised (zeroed) buffer of `bytes` bytes, at least 4 (wgpu rejects a binding of
/// an empty buffer): the outputs and scratch of the staging calls.
pub(crate) fn buffer(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4),
        usage,
        mapped_at_creation: false,
    })
}

/// A buffer initialised with `contents` (padded to 4 bytes). Unlike wgpu's
/// `create_buffer_init`, a lost device gives an `Err` instead of a panic.
pub(crate) fn upload(
    device: &wgpu::Device,
    label: &str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let size = (contents.len() as u64)
        .next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)
        .max(4);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage,
        mapped_at_creation: true,
    });
    buffer
        .get_mapped_range_mut(..)
        .map_err(|e| LsceError::Device(format!("{label}: {e}")))?
        .slice(..contents.len())
        .copy_from_slice(contents);
    buffer.unmap();
    Ok(buffer)
}

/// Reads back `sections` (`(buffer, bytes)` from the start of each `COPY_SRC` buffer) after
/// the commands already in `encoder`: one mappable buffer, one submit, one wait. `scopes` are
/// the caller's error scopes (pushed before it made its buffers), popped last-first before the
/// map's own error is looked at: a device error (out of memory, validation) explains a failed
/// map better. The staging calls' one readback.
pub(crate) fn read_sections(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    sections: &[(&wgpu::Buffer, u64)],
    scopes: Vec<wgpu::ErrorScopeGuard>,
) -> Result<Vec<Vec<u8>>> {
    let mut at = Vec::with_capacity(sections.len());
    let mut total = 0u64;
    for &(_, bytes) in sections {
        at.push(total);
        total += bytes.next_multiple_of(wgpu::MAP_ALIGNMENT);
    }
    let readback = buffer(
        device,
        "lsce readback",
        total,
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
    );
    for (&(buffer, bytes), &to) in sections.iter().zip(&at) {
        encoder.copy_buffer_to_buffer(buffer, 0, &readback, to, bytes);
    }
    let mapped = submit_and_map(device, queue, encoder, &readback);
    for scope in scopes.into_iter().rev() {
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(LsceError::Device(err.to_string()));
        }
    }
    mapped?;
    let view = readback
        .slice(..)
        .get_mapped_range()
        .map_err(|e| LsceError::Readback(e.to_string()))?;
    let out = sections
        .iter()
        .zip(&at)
        .map(|(&(_, bytes), &from)| view[from as usize..(from + bytes) as usize].to_vec())
        .collect();
    drop(view);
    readback.unmap();
    Ok(out)
}

/// Submits `encoder` and maps `readback` (a `MAP_READ` buffer the encoder copies into) for
/// reading, waiting for both. A lost device or a failed map gives an `Err`.
pub(crate) fn submit_and_map(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    encoder: wgpu::CommandEncoder,
    readback: &wgpu::Buffer,
) -> Result<()> {
    let index = queue.submit([encoder.finish()]);
    let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
    readback.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        // The receiver lives until the poll below returns; a failed send only means the
        // caller already gave up.
        let _ = sender.send(r);
    });
    device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
        .map_err(|e| LsceError::Readback(e.to_string()))?;
    match pollster::block_on(receiver.receive()) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(LsceError::Readback(e.to_string())),
        None => Err(LsceError::Readback("the map callback was dropped".into())),
    }
}
