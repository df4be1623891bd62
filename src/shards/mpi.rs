//! [`Collective`] over MPI (feature `mpi`): one `MPI_Allgather` per step.

use mpi::collective::CommunicatorCollectives;
use mpi::topology::Communicator;

use crate::error::Result;

use super::collective::Collective;

/// A [`Collective`] over an MPI communicator (rsmpi), e.g. `universe.world()`.
///
/// ```no_run
/// let universe = mpi::initialize().unwrap();
/// let mut collective = lsce::shards::MpiCollective::new(universe.world());
/// ```
pub struct MpiCollective<C: Communicator> {
    comm: C,
}

impl<C: Communicator> MpiCollective<C> {
    /// Wraps a communicator; its ranks are the shards.
    pub fn new(comm: C) -> Self {
        Self { comm }
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }
}

impl<C: Communicator> Collective for MpiCollective<C> {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_gather(&mut self, send: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; send.len() * self.size()];
        self.comm.all_gather_into(send, &mut out[..]);
        Ok(out)
    }
}
