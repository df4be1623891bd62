// The linear module's operand sharing where the kernel uses subgroups (src/compose.rs adds
// this file, or shaders/matmul_portable.wgsl without): the logits matmul's depth loop and the
// gradient products' tile.
//
// The eight invocations that share a row of blocks (the same ty, tx = 0..7) need the same
// eight rows of A (ty + 8 i) at every depth: of H in the logits matmul, of G in the products.
// The portable loops have each of them load all eight from workgroup memory: on a CPU
// adapter, which loads workgroup memory lane by lane, that is eight lanes' gathers for what is
// one value per row. Here each invocation loads row ty + 8 tx only, and the group's eight rows
// come from subgroupBroadcast of lanes 0..7, a register move. B is still read per lane: its
// columns differ per invocation. The products and their order are the portable loops': the
// same bits.
//
// This needs the group to be one whole subgroup, lane = tx: a subgroup size of 8 with
// subgroups that are consecutive runs of local_invocation_index. WGSL promises neither, so
// each workgroup checks both once and runs the portable loops when any invocation finds them
// false: correct on every device. Measured on lavapipe (8-lane subgroups; `--matmul` in
// benches/linear.rs): the logits matmul 1.10-1.16x and the unfused head 1.12-1.27x faster than
// on the portable path. Wider subgroups (a GPU's 32) take the portable loops: a group inside a
// wider subgroup would need subgroupShuffle from a computed lane, which ran 1.1x slower than
// the portable loop on lavapipe, and a GPU already serves a workgroup-memory read that all
// lanes make at one address as one broadcast.
//
// Each function branches once, outside its depth loops: branching per depth step ran
// lavapipe's matmul 1.35x slower (both paths' code and their merged block in one loop), so the
// two loops are written out beside their portable twins. Back edges per matmul step
// (src/linear/plan.rs `segment_tiles` counts about 40): the staging loop's 20 and the depth
// loop's 16, as the portable loop's; per product half fewer than the portable one's.

// 0: not yet checked, 1: broadcasts, 2: the portable loop. Private: each invocation keeps what
// its workgroup decided, so the check costs two barriers once per invocation.
var<private> mm_a_path: u32 = 0u;
var<workgroup> mm_a_agree: u32;

// Whether every invocation of the workgroup is lane lid % 8 of an 8-lane subgroup. Every
// invocation must call it (barriers): the callers run in the workgroup's uniform control flow,
// so every lane of each subgroup is active and the scans below count them all.
fn mm_a_broadcasts(lid: u32) -> bool {
    if (mm_a_path == 0u) {
        let lane = subgroupExclusiveAdd(1u);
        let size = subgroupAdd(1u);
        if (lid == 0u) {
            mm_a_agree = 1u;
        }
        workgroupBarrier();
        if (size != 8u || lane != lid % 8u) {
            mm_a_agree = 0u;
        }
        mm_a_path = select(2u, 1u, workgroupUniformLoad(&mm_a_agree) == 1u);
    }
    return mm_a_path == 1u;
}

fn mm_depth_loop(lid: u32, r0: u32, v0: u32) -> Block {
    if (!mm_a_broadcasts(lid)) {
        return mm_staged_loop(lid, r0, v0);
    }
    let tx = lid % 8u;
    let ty = lid / 8u;
    // This lane's row of A, ty + 8 tx: A's element (row y + 8 (4 h + q), depth k) is at
    // mm_ab[k * 16 + 2 y + h][q].
    let own = 2u * ty + tx / 4u;
    let q = tx % 4u;
    var c = zero_block();
    for (var k0 = 0u; k0 < LQ.dim; k0 += MM_DEPTH) {
        workgroupBarrier();
        mm_stage(lid, r0, v0, k0);
        workgroupBarrier();
        for (var k = 0u; k < MM_DEPTH; k++) {
            let at = k * 16u;
            c = add_broadcast(c, mm_ab[at + own][q], mm_ab[MM_B + at + 2u * tx], mm_ab[MM_B + at + 2u * tx + 1u]);
        }
    }
    return c;
}

// The gradient products' tile (shaders/linear.wgsl `staged_tile_product`) with G's rows
// ty + 8 i broadcast the same way: lane tx reads row ty + 8 tx of the G tile, one vec4 of four
// depths, instead of each lane reading all eight rows' vec4s. Same products, same order.
fn tile_product(lid: u32, first: u32, rows_end: u32, d0: u32, is_head: bool) -> Block {
    if (!mm_a_broadcasts(lid)) {
        return staged_tile_product(lid, first, rows_end, d0, is_head);
    }
    let tx = lid % 8u;
    let ty = lid / 8u;
    var c = zero_block();
    for (var half = 0u; half < 2u; half++) {
        stage_half(lid, first + half * 32u, rows_end, d0, is_head);
        for (var k4 = 0u; k4 < 8u; k4++) {
            let g = mm_tile[(ty + 8u * tx) * 16u + half * 8u + k4];
            let x = k4 * 64u + 2u * tx;
            c = add_broadcast(c, g.x, mm_ab[x], mm_ab[x + 1u]);
            c = add_broadcast(c, g.y, mm_ab[x + 16u], mm_ab[x + 17u]);
            c = add_broadcast(c, g.z, mm_ab[x + 32u], mm_ab[x + 33u]);
            c = add_broadcast(c, g.w, mm_ab[x + 48u], mm_ab[x + 49u]);
        }
    }
    return c;
}

// c += the outer product of the subgroup's eight values of `a` (lane i's: row ty + 8 i) with
// columns x and x2: block_add with its rows from lanes 0..7.
fn add_broadcast(c: Block, a: f32, x: vec4<f32>, x2: vec4<f32>) -> Block {
    let rows = vec4<f32>(subgroupBroadcast(a, 0u), subgroupBroadcast(a, 1u), subgroupBroadcast(a, 2u), subgroupBroadcast(a, 3u));
    let rows2 = vec4<f32>(subgroupBroadcast(a, 4u), subgroupBroadcast(a, 5u), subgroupBroadcast(a, 6u), subgroupBroadcast(a, 7u));
    return block_add(c, rows, rows2, x, x2);
}
