// A team is the whole workgroup; its reductions go through workgroup memory alone: a binary
// tree of log2(WG_SIZE) barrier steps, in a fixed order, so the result is bitwise reproducible.
// The fallback for devices without Features::SUBGROUP (wgpu's GL backend, some web adapters).
// WG_SIZE must be a power of two.
//
// The team interface, shared by the three team files (the Rust composer includes one):
//   struct TeamIds                    the entry point's builtins
//   team_begin(ids, wid, nwg)         call first
//   team_lid(), team_size()           this invocation's index in its team, the team's size
//   team_first_row(), team_row_stride()  the rows this team handles: first, first + stride, ..
//   team_row_label(r)                 row r's label, uniform across the team
//   team_max, team_sum4, team_min_u32, team_merge   reductions over the team, same result in
//                                     every invocation

struct TeamIds {
    @builtin(local_invocation_index) lid: u32,
}

var<private> team_lid_: u32;
var<private> team_first: u32;
var<private> team_stride: u32;
var<workgroup> team_v: array<vec4<f32>, WG_SIZE>;
var<workgroup> team_m: array<f32, WG_SIZE>;
var<workgroup> team_u: array<u32, WG_SIZE>;

fn team_begin(ids: TeamIds, wid: vec3<u32>, nwg: vec3<u32>) {
    team_lid_ = ids.lid;
    team_first = wid.y * nwg.x + wid.x;
    team_stride = nwg.x * nwg.y;
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

// Merges online softmax statistics; see team_subgroup.wgsl.
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
