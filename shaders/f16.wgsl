// IEEE binary16 words. Mirror: src/half.rs (f16_to_f32, f32_to_f16).

fn decode_word(x: u32) -> vec2<f32> {
    return unpack2x16float(x);
}

fn encode_word(v: vec2<f32>) -> u32 {
    return pack2x16float(v);
}
