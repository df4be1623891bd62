//! What the `sharded`, `linear` and `linear_parallel` benches share: their `main`, the
//! default adapter with a kernel, medians, and `rows x dim x vocab` shape lists.
#![allow(dead_code)] // each bench uses its part

use lsce::LossKernel;

/// A bench's `main`: runs `run`, and on an `Err` prints it after the bench's name and exits
/// with status 1.
pub fn main(name: &str, run: fn() -> Result<(), String>) {
    if let Err(e) = run() {
        eprintln!("{name} bench: {e}");
        std::process::exit(1);
    }
}

/// The default adapter's device and queue, a kernel on it, and the adapter's description.
pub fn default_device() -> Result<(wgpu::Device, wgpu::Queue, LossKernel, wgpu::AdapterInfo), String>
{
    let (device, queue) =
        lsce::request_device(&lsce::DeviceOptions::default()).map_err(|e| e.to_string())?;
    let kernel = LossKernel::new(&device).map_err(|e| e.to_string())?;
    let info = device.adapter_info();
    Ok((device, queue, kernel, info))
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `NxDxV,NxDxV,..`: rows, hidden size, vocabulary.
pub fn shapes(list: &str) -> Result<Vec<(u32, u32, u32)>, String> {
    list.split(',')
        .map(|s| {
            let v: Vec<u32> = s
                .split('x')
                .map(|x| x.parse().map_err(|e| format!("{s}: {e}")))
                .collect::<Result<_, _>>()?;
            match v[..] {
                [n, d, v] => Ok((n, d, v)),
                _ => Err(format!("a shape is NxDxV, not {s}")),
            }
        })
        .collect()
}
