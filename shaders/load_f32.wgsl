// Logit loads, f32 logits read one per unit (where the caller's buffers cannot be read as vec4,
// and in the strided kernel). `u` and `g` index the logits binding.
// Mirror: cpu::compute reads logit g as batch.logits.get(g).

const UNIT: u32 = 1u;

fn load_elem(g: u32) -> f32 {
    return logits[g];
}

// Unit u's logits; lanes past UNIT are 0 (and masked by the kernels).
fn load_unit(u: u32) -> vec4<f32> {
    return vec4<f32>(logits[u], 0.0, 0.0, 0.0);
}
