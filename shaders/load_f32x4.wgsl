// Logit loads, f32 logits read as vec4 units (the caller's buffers allow it: see
// `Regions::allow_wide` in src/windows.rs). `u` and `g` index the logits binding.

const UNIT: u32 = 4u;

fn load_elem(g: u32) -> f32 {
    return logits[g >> 2u][g & 3u];
}

fn load_unit(u: u32) -> vec4<f32> {
    return logits[u];
}
