// A team is the whole workgroup: the plumbing shared by the two ways it reduces, composed
// with team_reduce_memory.wgsl (a tree through workgroup memory; no subgroup operations, the
// fallback for devices without Features::SUBGROUP) or team_reduce_subgroups.wgsl (subgroup
// operations, then one exchange through workgroup memory).
//
// The team interface, shared with team_subgroup.wgsl (the Rust composer includes one):
//   struct TeamIds                    the entry point's builtins
//   team_begin(ids, wid, nwg)         call first
//   team_lid(), team_size()           this invocation's index in its team, the team's size
//   team_first_row(), team_row_stride()  the rows this team handles: first, first + stride, ..
//   team_row_label(r)                 row r's label, uniform across the team
//   team_max, team_sum4, team_min_u32, team_merge   reductions over the team, same result in
//                                     every invocation, reproducible bit for bit (for a
//                                     workgroup team: team_reduce_memory.wgsl or
//                                     team_reduce_subgroups.wgsl)

var<private> team_lid_: u32;
var<private> team_first: u32;
var<private> team_stride: u32;

fn team_begin(ids: TeamIds, wid: vec3<u32>, nwg: vec3<u32>) {
    team_lid_ = ids.lid;
    team_first = wid.y * nwg.x + wid.x;
    team_stride = nwg.x * nwg.y;
    reduce_begin(ids);
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
