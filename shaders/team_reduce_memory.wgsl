// Workgroup-team reductions through workgroup memory alone: a binary tree of log2(WG_SIZE)
// barrier steps in a fixed order. Composed after team_workgroup.wgsl; WG_SIZE must be a power
// of two.

struct TeamIds {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> team_v: array<vec4<f32>, WG_SIZE>;
var<workgroup> team_m: array<f32, WG_SIZE>;
var<workgroup> team_u: array<u32, WG_SIZE>;

fn reduce_begin(ids: TeamIds) {}

fn team_sum4(v: vec4<f32>) -> vec4<f32> {
    let lid = team_lid_;
    team_v[lid] = v;
    workgroupBarrier();
    for (var stride = WG_SIZE / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            team_v[lid] += team_v[lid + stride];
        }
        workgroupBarrier();
    }
    let r = team_v[0];
    workgroupBarrier();
    return r;
}

fn team_max(v: f32) -> f32 {
    let lid = team_lid_;
    team_m[lid] = v;
    workgroupBarrier();
    for (var stride = WG_SIZE / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            team_m[lid] = max(team_m[lid], team_m[lid + stride]);
        }
        workgroupBarrier();
    }
    let r = team_m[0];
    workgroupBarrier();
    return r;
}

fn team_min_u32(v: u32) -> u32 {
    let lid = team_lid_;
    team_u[lid] = v;
    workgroupBarrier();
    for (var stride = WG_SIZE / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            team_u[lid] = min(team_u[lid], team_u[lid + stride]);
        }
        workgroupBarrier();
    }
    let r = team_u[0];
    workgroupBarrier();
    return r;
}

// Merges online softmax statistics; see team_reduce_subgroups.wgsl.
fn team_merge(st: OnlineStats) -> OnlineStats {
    let lid = team_lid_;
    team_m[lid] = st.m;
    team_v[lid] = st.v;
    workgroupBarrier();
    for (var stride = WG_SIZE / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            let r = merge_stats(OnlineStats(team_m[lid], team_v[lid]),
                                OnlineStats(team_m[lid + stride], team_v[lid + stride]));
            team_m[lid] = r.m;
            team_v[lid] = r.v;
        }
        workgroupBarrier();
    }
    let r = OnlineStats(team_m[0], team_v[0]);
    workgroupBarrier();
    return r;
}
