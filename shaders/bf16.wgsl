// bfloat16 words: the high 16 bits of an f32, rounded to nearest even, NaN kept quiet.
// Mirror: src/half.rs (bf16_to_f32, f32_to_bf16).

fn decode_word(x: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(x << 16u), bitcast<f32>(x & 0xffff0000u));
}

fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (is_nan(x)) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn encode_word(v: vec2<f32>) -> u32 {
    return bf16_bits(v.x) | (bf16_bits(v.y) << 16u);
}
