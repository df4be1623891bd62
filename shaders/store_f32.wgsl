// Gradient stores, one f32 per element. `g` indexes the logits binding; the gradient's index is
// g + Q.grad_base - Q.logits_base (the host keeps the bases congruent modulo UNIT; in place
// they are equal). Needs `put_f32` (generated: the gradient binding or, in place, the logits).

fn store_elem(g: u32, v: f32) {
    put_f32(g + Q.grad_base - Q.logits_base, v);
}

// The gradient of unit u's logits that lie in [g_begin, g_end).
fn store_unit(u: u32, v: vec4<f32>, g_begin: u32, g_end: u32) {
    for (var i = 0u; i < UNIT; i++) {
        let g = u * UNIT + i;
        if (g >= g_begin && g < g_end) {
            store_elem(g, v[i]);
        }
    }
}
