// A team is the whole workgroup; its reductions are built on subgroup operations: one subgroup
// reduction, one exchange through workgroup memory, one sequential combine of the per-subgroup
// results (in a fixed order, so the result is bitwise reproducible). Two barriers per reduction.
//
// One of three interchangeable team files (see team_workgroup.wgsl for the interface).
// MAX_SUBGROUPS (WG_SIZE / the adapter's smallest subgroup) is generated.

struct TeamIds {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
}

var<private> team_lid_: u32;
var<private> team_first: u32;
var<private> team_stride: u32;
var<private> team_sg_id: u32;
var<private> team_sg_count: u32;
var<private> team_sg_lane: u32;
var<workgroup> team_v: array<vec4<f32>, MAX_SUBGROUPS>;
var<workgroup> team_m: array<f32, MAX_SUBGROUPS>;
var<workgroup> team_u: array<u32, MAX_SUBGROUPS>;

fn team_begin(ids: TeamIds, wid: vec3<u32>, nwg: vec3<u32>) {
    team_lid_ = ids.lid;
    team_first = wid.y * nwg.x + wid.x;
    team_stride = nwg.x * nwg.y;
    team_sg_id = ids.sg_id;
    team_sg_count = ids.sg_count;
    team_sg_lane = ids.sg_lane;
}

fn team_lid() -> u32 {
    return team_lid_;
}

fn team_size() -> u32 {
    return WG_SIZE;
}

fn team_first_row() -> u32 {
    return team_first;
}

fn team_row_stride() -> u32 {
    return team_stride;
}

var<workgroup> team_label: i32;

// The row's label, read once and made workgroup-uniform (branches on it hold barriers).
fn team_row_label(r: u32) -> i32 {
    if (team_lid_ == 0u) {
        team_label = row_label(r);
    }
    return workgroupUniformLoad(&team_label);
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
// exp(z - m); v.yzw are plain sums. Returns the workgroup's (max, sums) with v.x relative to it.
fn team_merge(st: OnlineStats) -> OnlineStats {
    let sm = subgroupMax(st.m);
    let sv = subgroupAdd(vec4<f32>(st.v.x * rescale(st.m, sm), st.v.yzw));
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
