//! Property tests: random shapes, conventions, eps, reductions, ignore patterns, weights,
//! logit scale, soft-cap, z-loss, probability targets and extreme values, GPU against the CPU
//! reference. 300 cases by default; `LSCE_PROPTEST_CASES=5000 cargo test --release --test
//! properties` runs a longer search.

mod common;

use common::*;
use lsce::{Batch, LossSpec, Reduction, Shape, Smoothing, StagingOptions, UpstreamGrad};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Case {
    dims: Vec<usize>,
    spec: LossSpec,
    soft: bool,
    weights: bool,
    ignore_every: u32,
    upstream: bool,
    scale: f32,
    extremes: u8,
    seed: u64,
}

fn smoothing() -> impl Strategy<Value = Smoothing> {
    let eps = prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..=1.0];
    prop_oneof![
        eps.clone().prop_map(Smoothing::Uniform),
        eps.prop_map(Smoothing::OffTarget),
        (0.0f32..1.5, 0.0f32..0.3).prop_map(|(on, off)| Smoothing::Explicit { on, off }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let dims = prop_oneof![
        4 => (1usize..40, 1usize..300).prop_map(|(r, k)| vec![r, k]),
        1 => (1usize..4, 1usize..6000).prop_map(|(r, k)| vec![r, k]),
        1 => (1usize..4, 1usize..40, 1usize..30).prop_map(|(n, k, s)| vec![n, k, s]),
    ];
    let reduction = prop_oneof![
        Just(Reduction::None),
        Just(Reduction::Sum),
        Just(Reduction::Mean)
    ];
    (
        dims,
        smoothing(),
        reduction,
        (any::<bool>(), any::<bool>(), 0u32..5, any::<bool>()),
        (
            0.1f32..4.0,
            prop::option::of(1.0f32..50.0),
            prop_oneof![Just(0.0f32), 1e-5f32..1e-2],
        ),
        (0.1f32..20.0, 0u8..4, any::<u64>(), any::<bool>()),
    )
        .prop_map(
            |(
                dims,
                smoothing,
                reduction,
                (soft, weights, ignore_every, upstream),
                (logit_scale, softcap, z),
                (scale, extremes, seed, excluded),
            )| {
                let classes = dims[1] as u32;
                let mut spec = LossSpec::default()
                    .with_smoothing(smoothing)
                    .with_reduction(reduction)
                    .with_logit_scale(logit_scale)
                    .with_softcap(softcap)
                    .with_z_loss(z);
                if excluded && classes >= 2 {
                    spec = spec.with_excluded_class(Some((seed % u64::from(classes)) as u32));
                }
                Case {
                    dims,
                    spec,
                    soft,
                    weights,
                    ignore_every,
                    upstream,
                    scale,
                    extremes,
                    seed,
                }
            },
        )
}

fn run(case: &Case) {
    let shape = Shape::class_dim1(&case.dims).unwrap();
    let mut x = logits(shape.elements(), case.scale, case.seed);
    let mut rng = common::Rng::new(case.seed ^ 0x9e37_79b9_7f4a_7c15);
    // Extremes: 1 = +-1e4 entries, 2 = all-equal rows, 3 = -inf entries (masked vocabulary).
    for v in x.iter_mut() {
        let (pick, sign) = ((rng.uniform() as f32) < 0.05, (rng.uniform() as f32) < 0.5);
        match case.extremes {
            1 if pick => *v = if sign { 1e4 } else { -1e4 },
            2 => *v = 0.25,
            3 if pick => *v = f32::NEG_INFINITY,
            _ => {}
        }
    }
    let y = labels(
        shape.rows(),
        shape.classes(),
        case.ignore_every,
        case.seed + 1,
    );
    let probs: Vec<f32> = (0..shape.elements())
        .map(|_| rng.uniform() as f32)
        .collect();
    let w: Vec<f32> = (0..shape.classes())
        .map(|_| (rng.uniform() as f32) * 2.0)
        .collect();
    let per_row: Vec<f32> = (0..shape.rows()).map(|_| rng.normal() as f32).collect();
    let mut batch = if case.soft {
        Batch::probabilities(shape, &x, &probs)
    } else {
        Batch::classes(shape, &x, &y)
    };
    if case.weights {
        batch = batch.with_weights(&w);
    }
    if case.upstream {
        batch = batch.with_upstream(match case.spec.reduction {
            Reduction::None => UpstreamGrad::PerRow(&per_row),
            _ => UpstreamGrad::Scalar(per_row[0]),
        });
    }
    let accuracy = !case.soft;
    check_every_path(
        &format!("{case:?}"),
        &case.spec,
        &batch,
        StagingOptions {
            accuracy,
            ..Default::default()
        },
    );
}

fn cases() -> u32 {
    std::env::var("LSCE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu_reference(case in case()) {
        run(&case);
    }
}
