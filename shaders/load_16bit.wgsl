// Logit loads, 16-bit logits, two per 32-bit word (element 2i in the low half): a unit is two
// words, four logits, full vec4 lanes like f32 units. Needs `logit_word` (generated: a plain or
// an atomic load) and `decode_word` (f16.wgsl or bf16.wgsl).

const UNIT: u32 = 4u;

fn load_word(w: u32) -> vec2<f32> {
    return decode_word(logit_word(w));
}

// The second word of a unit at the end of the binding may lie past it: a bounds-checked read
// gives a value that the row's lane mask discards.
fn load_unit(u: u32) -> vec4<f32> {
    return vec4<f32>(load_word(2u * u), load_word(2u * u + 1u));
}

fn load_elem(g: u32) -> f32 {
    return load_word(g >> 1u)[g & 1u];
}
