//! The GPU plumbing the example needs beside lsce: storage buffers, uploads and one readback.

use bytemuck::Pod;
use wgpu::util::DeviceExt;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Bytes of an f32 (every buffer of the example holds 4-byte elements).
pub const F32: u64 = 4;

/// An uninitialised storage buffer with extra `usage`.
pub fn storage(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | usage,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `data`, with extra `usage`.
pub fn upload<T: Pod>(
    device: &wgpu::Device,
    label: &str,
    data: &[T],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(data),
        usage: wgpu::BufferUsages::STORAGE | usage,
    })
}

/// Appends copies of `sources` into one new mappable buffer, submits `encoder`, waits, and
/// returns the bytes of each source.
pub fn submit_and_read(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    sources: &[&wgpu::Buffer],
) -> Result<Vec<Vec<u8>>> {
    let total = sources.iter().map(|b| b.size()).sum();
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: total,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut at = 0;
    for source in sources {
        encoder.copy_buffer_to_buffer(source, 0, &readback, at, source.size());
        at += source.size();
    }
    queue.submit([encoder.finish()]);
    let (sender, receiver) = std::sync::mpsc::channel();
    readback.map_async(wgpu::MapMode::Read, .., move |result| {
        // The receiver outlives the poll below, which runs this callback.
        let _ = sender.send(result);
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    receiver.recv()??;
    let view = readback.get_mapped_range(..)?;
    let mut at = 0;
    Ok(sources
        .iter()
        .map(|source| {
            let bytes = view[at..at + source.size() as usize].to_vec();
            at += source.size() as usize;
            bytes
        })
        .collect())
}
