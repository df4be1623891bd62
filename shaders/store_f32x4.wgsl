// Gradient stores, f32 as vec4 units. Needs `put_lane` and `put_unit` (generated: the gradient
// binding or, in place, the logits).

fn store_elem(g: u32, v: f32) {
    put_lane(g + Q.grad_base - Q.logits_base, v);
}

// A whole unit inside [g_begin, g_end) is one vec4 store; a unit shared with a neighbouring row
// (K not a multiple of 4) is written lane by lane, never read back.
fn store_unit(u: u32, v: vec4<f32>, g_begin: u32, g_end: u32) {
    let g = u * 4u;
    if (g >= g_begin && g + 4u <= g_end) {
        put_unit(u + Q.grad_base / 4u - Q.logits_base / 4u, v);
    } else {
        for (var i = 0u; i < 4u; i++) {
            if (g + i >= g_begin && g + i < g_end) {
                store_elem(g + i, v[i]);
            }
        }
    }
}
