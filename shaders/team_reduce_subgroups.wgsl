// Workgroup-team reductions on subgroup operations: one subgroup reduction, one exchange
// through workgroup memory, one sequential combine of the per-subgroup results in a fixed
// order. Two barriers per reduction. Composed after team_workgroup.wgsl; MAX_SUBGROUPS
// (WG_SIZE / the adapter's smallest subgroup) is generated.

struct TeamIds {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
}

var<private> team_sg_id: u32;
var<private> team_sg_count: u32;
var<private> team_sg_lane: u32;
var<workgroup> team_v: array<vec4<f32>, MAX_SUBGROUPS>;
var<workgroup> team_m: array<f32, MAX_SUBGROUPS>;
var<workgroup> team_u: array<u32, MAX_SUBGROUPS>;

fn reduce_begin(ids: TeamIds) {
    team_sg_id = ids.sg_id;
    team_sg_count = ids.sg_count;
    team_sg_lane = ids.sg_lane;
}

fn team_sum4(v: vec4<f32>) -> vec4<f32> {
    let s = subgroupAdd(v);
    if (team_sg_lane == 0u) {
        team_v[team_sg_id] = s;
    }
    workgroupBarrier();
    var acc = team_v[0];
    for (var i = 1u; i < team_sg_count; i++) {
        acc += team_v[i];
    }
    workgroupBarrier();
    return acc;
}

fn team_max(v: f32) -> f32 {
    let s = subgroupMax(v);
    if (team_sg_lane == 0u) {
        team_m[team_sg_id] = s;
    }
    workgroupBarrier();
    var acc = team_m[0];
    for (var i = 1u; i < team_sg_count; i++) {
        acc = max(acc, team_m[i]);
    }
    workgroupBarrier();
    return acc;
}

fn team_min_u32(v: u32) -> u32 {
    let s = subgroupMin(v);
    if (team_sg_lane == 0u) {
        team_u[team_sg_id] = s;
    }
    workgroupBarrier();
    var acc = team_u[0];
    for (var i = 1u; i < team_sg_count; i++) {
        acc = min(acc, team_u[i]);
    }
    workgroupBarrier();
    return acc;
}

// Merges online softmax statistics: `m` is this invocation's running max, `v.x` its sum of
// exp(z - m), `v.y` its target sum shifted by m, `v.z` that sum's mass (see OnlineStats).
// Returns the workgroup's max and sums relative to it.
fn team_merge(st: OnlineStats) -> OnlineStats {
    let sm = subgroupMax(st.m);
    let sv = subgroupAdd(relative_to(st, sm));
    if (team_sg_lane == 0u) {
        team_m[team_sg_id] = sm;
        team_v[team_sg_id] = sv;
    }
    workgroupBarrier();
    var acc = OnlineStats(team_m[0], team_v[0]);
    for (var i = 1u; i < team_sg_count; i++) {
        acc = merge_stats(acc, OnlineStats(team_m[i], team_v[i]));
    }
    workgroupBarrier();
    return acc;
}
