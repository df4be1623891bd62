//! The adapter side of the bench: a device with the crate's kernel (configured from the
//! command line), the bench's own pipelines, timestamp queries, readback and waiting.

use std::sync::mpsc;

use lsce::{KernelConfig, LossKernel};

use crate::cli::{Options, MAX_REPEATS};
use crate::unfused::Pipelines;

/// Timestamp queries around each timed pass.
pub struct Timer {
    pub queries: wgpu::QuerySet,
    pub resolve: wgpu::Buffer,
    pub period_ns: f64,
}

/// One adapter's device, the crate's kernel configured from the options, the bench's own
/// pipelines and the timestamp queries.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub kernel: LossKernel,
    /// The bench's own kernels.
    pub unfused: Pipelines,
    pub timer: Option<Timer>,
    /// Set when timestamps came back unusable and a measurement fell back to the wall clock.
    pub fell_back: std::cell::Cell<bool>,
}

impl Gpu {
    pub fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: &Options,
    ) -> Result<Self, String> {
        let defaults = KernelConfig::for_device(&device);
        let config = KernelConfig {
            row_workgroup: options.row_workgroup.unwrap_or(defaults.row_workgroup),
            row_cache: options.row_cache.unwrap_or(defaults.row_cache),
            use_subgroups: options.subgroups,
            max_row_workgroups: options.row_groups.unwrap_or(defaults.max_row_workgroups),
            min_row_teams: options.row_teams.unwrap_or(defaults.min_row_teams),
            subgroup_rows_max_classes: options
                .subgroup_rows_max_classes
                .unwrap_or(defaults.subgroup_rows_max_classes),
        };
        let kernel = LossKernel::with_config(&device, config)
            .map_err(|e| format!("kernel configuration {config:?}: {e}"))?;
        let unfused = Pipelines::new(&device)?;
        let timer = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| {
                let count = 2 * MAX_REPEATS as u32;
                Timer {
                    queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                        label: Some("lsce bench timestamps"),
                        ty: wgpu::QueryType::Timestamp,
                        count,
                    }),
                    resolve: device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("lsce bench timestamps"),
                        size: u64::from(count) * 8,
                        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    }),
                    period_ns: f64::from(queue.get_timestamp_period()),
                }
            });
        Ok(Self {
            device,
            queue,
            kernel,
            unfused,
            timer,
            fell_back: std::cell::Cell::new(false),
        })
    }

    pub fn timing_name(&self) -> &'static str {
        match (&self.timer, self.fell_back.get()) {
            (Some(_), false) => "GPU timestamps",
            (Some(_), true) => "GPU timestamps, wall clock where they were unusable",
            (None, _) => "wall clock (no TIMESTAMP_QUERY)",
        }
    }

    /// Copies `size` bytes of `buffer` from `offset` back to the host.
    pub fn read(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>, String> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce bench readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = mpsc::channel();
        let slice = staging.slice(..);
        slice.map_async(wgpu::MapMode::Read, move |r| {
            // The receiver waits below; a failed send cannot happen while it does.
            let _ = sender.send(r);
        });
        self.wait(None)?;
        receiver
            .recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("mapping a readback buffer: {e}"))?;
        let bytes = slice
            .get_mapped_range()
            .map_err(|e| e.to_string())?
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    pub fn wait(&self, submission: Option<wgpu::SubmissionIndex>) -> Result<(), String> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: submission,
                timeout: None,
            })
            .map(drop)
            .map_err(|e| format!("waiting for the GPU: {e}"))
    }
}
