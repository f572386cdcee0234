//! Synchronous engine: each operation runs to completion inside `submit`.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::{run_sync, Completion, Engine, EngineError, Op};
use crate::disk::Disk;

pub struct SyncEngine {
    disk: Arc<Disk>,
    done: Vec<Completion>,
}

impl SyncEngine {
    pub fn new(disk: Arc<Disk>) -> Self {
        SyncEngine {
            disk,
            done: Vec::new(),
        }
    }
}

impl Engine for SyncEngine {
    fn submit(&mut self, token: usize, op: Op) -> Result<(), EngineError> {
        let result = run_sync(&self.disk, &op);
        self.done.push(Completion { token, result });
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn wait(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}
