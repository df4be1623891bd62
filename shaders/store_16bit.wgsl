// Gradient stores, 16-bit, two per word (a 16-bit gradient always has the logits' type). Needs
// `encode_word` (f16.wgsl or bf16.wgsl) and `put_word` / `put_half` (generated: plain stores
// when rows never share a word, atomic half-word updates otherwise, into the gradient binding
// or, in place, the logits).

fn store_elem(g: u32, v: f32) {
    store_word(g >> 1u, vec2<f32>(v), g, g + 1u);
}

fn store_unit(u: u32, v: vec4<f32>, g_begin: u32, g_end: u32) {
    store_word(2u * u, v.xy, g_begin, g_end);
    store_word(2u * u + 1u, v.zw, g_begin, g_end);
}

// The gradient of the logits of word i that lie in [g_begin, g_end). Both bases count 2-byte
// elements, so word indices shift by the base difference halved.
fn store_word(i: u32, v: vec2<f32>, g_begin: u32, g_end: u32) {
    let w = i + Q.grad_base / 2u - Q.logits_base / 2u;
    let bits = encode_word(v);
    let lo = 2u * i >= g_begin && 2u * i < g_end;
    let hi = 2u * i + 1u >= g_begin && 2u * i + 1u < g_end;
    if (lo && hi) {
        put_word(w, bits);
    } else if (lo || hi) {
        put_half(w, bits, select(0xffff0000u, 0xffffu, lo));
    }
}
