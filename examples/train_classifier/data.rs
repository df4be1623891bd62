//! The synthetic data set: overlapping Gaussian blobs, one per class, with every
//! `FLIP_EVERY`-th training label replaced by another class, and a clean held-out set.

pub const CLASSES: u32 = 10;
pub const DIMS: u32 = 24;
pub const TRAIN_POINTS: u32 = 3000;
pub const TEST_POINTS: u32 = 2000;
/// Every `FLIP_EVERY`-th training label is replaced by a uniformly chosen other class: 20%.
pub const FLIP_EVERY: usize = 5;
/// Standard deviation of the class centres' coordinates, against unit noise within a class:
/// small enough that neighbouring blobs overlap.
const CENTRE_SPREAD: f64 = 0.55;

/// SplitMix64: tiny and deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        (self.uniform() * f64::from(n)) as u32
    }

    /// Standard normal (Box-Muller; `1 - u` keeps the logarithm finite).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// The synthetic data set, row-major `[points, DIMS]`.
pub struct Data {
    pub centres: Vec<f64>,
    pub train_x: Vec<f32>,
    /// The labels training sees, 20% of them wrong.
    pub train_labels: Vec<i32>,
    /// The true classes of the training points.
    pub train_clean: Vec<i32>,
    pub test_x: Vec<f32>,
    pub test_labels: Vec<i32>,
}

impl Data {
    pub fn generate(rng: &mut Rng) -> Self {
        let centres: Vec<f64> = (0..CLASSES * DIMS)
            .map(|_| CENTRE_SPREAD * rng.normal())
            .collect();
        let mut sample = |points: u32| {
            let mut x = Vec::with_capacity((points * DIMS) as usize);
            let mut labels = Vec::with_capacity(points as usize);
            for _ in 0..points {
                let class = rng.below(CLASSES);
                let centre = &centres[(class * DIMS) as usize..][..DIMS as usize];
                x.extend(centre.iter().map(|c| (c + rng.normal()) as f32));
                labels.push(class as i32);
            }
            (x, labels)
        };
        let (train_x, train_clean) = sample(TRAIN_POINTS);
        let (test_x, test_labels) = sample(TEST_POINTS);
        // The points are i.i.d., so every fifth one is a random fifth, and it spreads the wrong
        // labels evenly over the minibatches.
        let train_labels = train_clean
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                if i % FLIP_EVERY == 0 {
                    (y + 1 + rng.below(CLASSES - 1) as i32) % CLASSES as i32
                } else {
                    y
                }
            })
            .collect();
        Self {
            centres,
            train_x,
            train_labels,
            train_clean,
            test_x,
            test_labels,
        }
    }

    /// Accuracy of the best possible classifier on the held-out set: with equal priors and the
    /// same isotropic noise in every class, that is the nearest true centre.
    pub fn bayes_accuracy(&self) -> f64 {
        let dims = DIMS as usize;
        let right = self
            .test_x
            .chunks(dims)
            .zip(&self.test_labels)
            .filter(|(x, &y)| {
                let distance = |c: &[f64]| -> f64 {
                    x.iter()
                        .zip(c)
                        .map(|(&x, c)| (f64::from(x) - c).powi(2))
                        .sum()
                };
                let nearest = self
                    .centres
                    .chunks(dims)
                    .map(distance)
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(class, _)| class as i32);
                nearest == Some(y)
            })
            .count();
        right as f64 / self.test_labels.len() as f64
    }
}
