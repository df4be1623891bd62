// A team is one subgroup: each subgroup of the workgroup handles its own rows, and every
// reduction is a single subgroup operation. No barriers, no workgroup memory: the fastest shape
// where rows are short (many rows per workgroup) and where barriers are expensive (CPU
// adapters, which run a workgroup's subgroups as coroutines). Reduction order is the
// subgroup operation's, fixed for a given device and pipeline.
//
// The alternative to team_workgroup.wgsl (which documents the interface).
// Needs Features::SUBGROUP.

struct TeamIds {
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
}

var<private> team_lane: u32;
var<private> team_size_: u32;
var<private> team_first: u32;
var<private> team_stride: u32;

fn team_begin(ids: TeamIds, wid: vec3<u32>, nwg: vec3<u32>) {
    team_lane = ids.lane;
    team_size_ = ids.size;
    team_first = (wid.y * nwg.x + wid.x) * ids.sg_count + ids.sg_id;
    team_stride = nwg.x * nwg.y * ids.sg_count;
}

fn team_lid() -> u32 {
    return team_lane;
}

fn team_size() -> u32 {
    return team_size_;
}

fn team_first_row() -> u32 {
    return team_first;
}

fn team_row_stride() -> u32 {
    return team_stride;
}

// Every lane reads the same label: uniform across the subgroup without an exchange.
fn team_row_label(r: u32) -> i32 {
    return row_label(r);
}

fn team_sum4(v: vec4<f32>) -> vec4<f32> {
    return subgroupAdd(v);
}

fn team_max(v: f32) -> f32 {
    return subgroupMax(v);
}

fn team_min_u32(v: u32) -> u32 {
    return subgroupMin(v);
}

// Merges the team's online softmax statistics (OnlineStats, common.wgsl); the workgroup
// versions are in team_reduce_memory.wgsl and team_reduce_subgroups.wgsl.
fn team_merge(st: OnlineStats) -> OnlineStats {
    let sm = subgroupMax(st.m);
    return OnlineStats(sm, subgroupAdd(relative_to(st, sm)));
}
