// The linear module's operand sharing without subgroups (src/compose.rs adds this file, or
// shaders/matmul_subgroups.wgsl where the kernel uses subgroups): the logits matmul's depth
// loop and the gradient products' half, both through workgroup memory only. Every backend.

fn mm_depth_loop(lid: u32, r0: u32, v0: u32) -> Block {
    return mm_staged_loop(lid, r0, v0);
}

fn tile_product(lid: u32, first: u32, rows_end: u32, d0: u32, is_head: bool) -> Block {
    return staged_tile_product(lid, first, rows_end, d0, is_head);
}
