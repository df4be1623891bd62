//! The command line: options, their defaults and their parsing.

use lsce::{Dtype, Shape};

pub const USAGE: &str = "\
usage: cargo bench --bench lsce -- [options]

  --backend B       vulkan, metal, dx12, gl, or all (every adapter, one after the other);
                    default: the default adapter (WGPU_BACKEND / WGPU_ADAPTER_NAME apply)
  --adapter NAME    only adapters whose name contains NAME (case-insensitive)
  --shapes LIST     ROWSxCLASSES,... (default 4096x1000,4096x32000,256x128256,64x262144,
                    16384x50257; with --quick 1024x1000,256x32000,32x128256,8x262144)
  --dtype LIST      f32, f16, bf16, comma-separated (default f32)
  --repeats N       timed runs per measurement, median reported (default 7; --quick 3)
  --warmup N        untimed runs first (default 2; --quick 1)
  --max-memory GIB  skip shapes whose rows x classes buffers (8 bytes a logit) exceed GIB
  --row-workgroup N, --row-cache N, --row-groups N|all, --row-teams N,
  --subgroup-rows-max-classes N, --no-subgroups
                    override the adapter's default lsce::KernelConfig
  --quick           a small set of shapes and fewer repeats
  --json FILE       write the results as a JSON array of records
  --plot FILE       write an SVG of ratio_to_copy against classes
  --help            this text";

const DEFAULT_SHAPES: &[(u32, u32)] = &[
    (4096, 1000),
    (4096, 32000),
    (256, 128256),
    (64, 262144),
    (16384, 50257),
];
const QUICK_SHAPES: &[(u32, u32)] = &[(1024, 1000), (256, 32000), (32, 128256), (8, 262144)];
/// Query-set slots are limited to 4096, two per timed run.
pub const MAX_REPEATS: usize = 1000;
/// The CPU reference times at most this many logits and scales to the whole shape.
pub const CPU_MAX_ELEMENTS: u64 = 1 << 22;

#[derive(Clone, Debug)]
pub enum BackendChoice {
    Default,
    Only(wgpu::Backends),
    All,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub backend: BackendChoice,
    pub adapter: Option<String>,
    pub shapes: Vec<Shape>,
    pub dtypes: Vec<Dtype>,
    pub repeats: usize,
    pub warmup: usize,
    pub max_memory: Option<u64>,
    /// Overrides of the adapter's default `KernelConfig`.
    pub row_workgroup: Option<u32>,
    pub row_cache: Option<u32>,
    /// `Some(None)`: one row-kernel workgroup per row (`--row-groups all`).
    pub row_groups: Option<Option<u32>>,
    /// `KernelConfig::min_row_teams` (`--row-teams`): split rows below this many.
    pub row_teams: Option<u32>,
    /// `KernelConfig::subgroup_rows_max_classes` (`--subgroup-rows-max-classes`): rows of at
    /// most this many classes get a subgroup each.
    pub subgroup_rows_max_classes: Option<u32>,
    pub subgroups: bool,
    pub json: Option<String>,
    pub plot: Option<String>,
    /// Run by `cargo test`: the start-up check and one small case, no files.
    pub smoke: bool,
}

/// `Ok(None)` for `--help`.
pub fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        backend: BackendChoice::Default,
        adapter: None,
        shapes: vec![shape(64, 1000)?],
        dtypes: vec![Dtype::F32],
        repeats: 1,
        warmup: 0,
        max_memory: None,
        row_workgroup: None,
        row_cache: None,
        row_groups: None,
        row_teams: None,
        subgroup_rows_max_classes: None,
        subgroups: true,
        json: None,
        plot: None,
        smoke: true,
    };
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench` (and may pass libtest
        // flags, which mean nothing here): keep that run short and ignore the arguments.
        return Ok(Some(o));
    }
    o.smoke = false;
    let (mut shapes, mut repeats, mut warmup, mut quick) = (None, None, None, false);
    let mut i = 0;
    while i < args.len() {
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match args[i].split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (args[i].as_str(), None),
        };
        i += 1;
        let mut value = || -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            let v = args
                .get(i)
                .filter(|v| !v.starts_with("--"))
                .ok_or(format!("{flag} needs a value"))?;
            i += 1;
            Ok(v.clone())
        };
        match flag {
            "--bench" => {}
            "--help" | "-h" => return Ok(None),
            "--quick" => quick = true,
            "--backend" => o.backend = parse_backend(&value()?)?,
            "--adapter" => o.adapter = Some(value()?),
            "--shapes" => shapes = Some(parse_shapes(&value()?)?),
            "--dtype" => o.dtypes = parse_dtypes(&value()?)?,
            "--repeats" => repeats = Some(parse_count(flag, &value()?, 1, MAX_REPEATS)?),
            "--warmup" => warmup = Some(parse_count(flag, &value()?, 0, 100)?),
            "--max-memory" => {
                let v = value()?;
                let gib: f64 = v
                    .parse()
                    .ok()
                    .filter(|g: &f64| g.is_finite() && *g > 0.0)
                    .ok_or(format!(
                        "--max-memory: `{v}` is not a positive number of GiB"
                    ))?;
                o.max_memory = Some((gib * (1u64 << 30) as f64) as u64);
            }
            // The kernel checks the values against the device (LossKernel::with_config).
            "--row-workgroup" => {
                o.row_workgroup = Some(parse_count(flag, &value()?, 1, 1 << 16)? as u32)
            }
            "--row-cache" => o.row_cache = Some(parse_count(flag, &value()?, 1, 1 << 16)? as u32),
            "--row-teams" => o.row_teams = Some(parse_count(flag, &value()?, 1, 1 << 24)? as u32),
            "--subgroup-rows-max-classes" => {
                let v = value()?;
                o.subgroup_rows_max_classes = Some(
                    v.parse()
                        .map_err(|_| format!("{flag}: `{v}` is not an integer in [0, 2^32)"))?,
                );
            }
            "--row-groups" => {
                let v = value()?;
                o.row_groups = Some(if v == "all" {
                    None
                } else {
                    Some(parse_count(flag, &v, 1, 1 << 30)? as u32)
                });
            }
            "--no-subgroups" => o.subgroups = false,
            "--json" => o.json = Some(value()?),
            "--plot" => o.plot = Some(value()?),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    o.shapes = match shapes {
        Some(s) => s,
        None => (if quick { QUICK_SHAPES } else { DEFAULT_SHAPES })
            .iter()
            .map(|&(r, c)| shape(r, c))
            .collect::<Result<_, _>>()?,
    };
    o.repeats = repeats.unwrap_or(if quick { 3 } else { 7 });
    o.warmup = warmup.unwrap_or(if quick { 1 } else { 2 });
    Ok(Some(o))
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "all" => BackendChoice::All,
        "vulkan" => BackendChoice::Only(wgpu::Backends::VULKAN),
        "metal" => BackendChoice::Only(wgpu::Backends::METAL),
        "dx12" => BackendChoice::Only(wgpu::Backends::DX12),
        "gl" => BackendChoice::Only(wgpu::Backends::GL),
        _ => {
            return Err(format!(
                "--backend: `{s}` is not vulkan, metal, dx12, gl or all"
            ))
        }
    })
}

pub fn shape(rows: u32, classes: u32) -> Result<Shape, String> {
    Shape::matrix(rows, classes).map_err(|e| format!("shape {rows}x{classes}: {e}"))
}

fn parse_shapes(s: &str) -> Result<Vec<Shape>, String> {
    s.split(',')
        .map(|item| {
            let item = item.trim();
            let bad = || format!("--shapes: `{item}` is not ROWSxCLASSES (e.g. 4096x32000)");
            let (r, c) = item.split_once(['x', 'X']).ok_or_else(bad)?;
            let parse = |v: &str| v.trim().parse::<u32>().ok().filter(|&n| n > 0);
            let (r, c) = parse(r).zip(parse(c)).ok_or_else(|| {
                format!("{}: rows and classes must be integers in [1, 2^32)", bad())
            })?;
            shape(r, c)
        })
        .collect()
}

fn parse_dtypes(s: &str) -> Result<Vec<Dtype>, String> {
    s.split(',')
        .map(|d| {
            let d = d.trim().to_ascii_lowercase();
            d.parse()
                .map_err(|_| format!("--dtype: `{d}` is not f32, f16 or bf16"))
        })
        .collect()
}

fn parse_count(flag: &str, v: &str, min: usize, max: usize) -> Result<usize, String> {
    v.parse()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or(format!("{flag}: `{v}` is not an integer in [{min}, {max}]"))
}
