//! The vhost-user request handler of one connection, run by the relay thread.
//!
//! [`FrontendHandler`] is the daemon's implementation of the `vhost` crate's
//! `VhostUserBackendReqHandlerMut`: feature negotiation, the memory table, the queues'
//! set-up and tear-down, the config space. vhost's `BackendReqHandler` parses each message
//! and calls it. [`DeviceLink`] is what the relay ([`crate::relay`]) drives: once the relay
//! has written a whole message (with its file descriptors) into the connection's private
//! socket, it calls [`DeviceLink::handle`], which reads that message from the other end and
//! writes the reply there, on the relay thread; no thread waits for the connection.
//!
//! Why nothing here blocks the relay thread:
//! - the message is read only once it is whole in the socket, and the handler's end of the
//!   socket is non-blocking besides: a read that would wait fails (and ends the connection)
//!   instead;
//! - at most one reply is ever in the socket (the relay reads the frontend's next message
//!   only once the previous reply has been passed on), at most 4 KiB and a header, far below
//!   a unix socket's buffer;
//! - what must wait is done beforehand, elsewhere: GET_VRING_BASE is held back by the relay
//!   ([`DeviceLink::must_wait`]) while the worker that owns the queue stops it, which ends
//!   once its requests in flight have completed; the relay watches the connection's "stopped"
//!   eventfd ([`DeviceLink::wake_fd`]) and only then lets the handler answer, at once. A
//!   write-cache change is only recorded (the workers apply it before their next request,
//!   `BlkBackend::handle_event`); a new memory table is published through the guest memory's
//!   atomic pointer, which the workers read as they take chains;
//! - the locks it takes (a queue's [`Vring`] state, the backend's list of memory guards) are
//!   never held by anyone across a wait.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use tracing::{debug, error};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::vring::Vring;
use crate::worker_loop::WorkerLoop;

/// Memory slots offered (CONFIGURE_MEM_SLOTS, GET_MAX_MEM_SLOTS), as vhost in the kernel
/// has; ADD_MEM_REG past them is refused here (each region holds a mapping and its file
/// open).
pub(crate) const MAX_MEM_SLOTS: usize = 509;
const GET_VRING_BASE: u32 = vhost::vhost_user::message::FrontendReq::GET_VRING_BASE as u32;

/// Where a frontend's user address lands in guest memory.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The handler of one connection's requests (see the module documentation).
pub struct FrontendHandler {
    backend: Arc<BlkBackend>,
    loops: Vec<Arc<WorkerLoop>>,
    vrings: Vec<Vring>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
}

fn handler_error(e: impl std::fmt::Display) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl FrontendHandler {
    /// The handler of `backend`'s connection, whose queues are `vrings` over `mem` and whose
    /// workers run `loops`.
    pub fn new(
        backend: Arc<BlkBackend>,
        vrings: Vec<Vring>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        loops: Vec<Arc<WorkerLoop>>,
    ) -> Self {
        FrontendHandler {
            backend,
            loops,
            vrings,
            mem,
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
        }
    }

    fn vring(&self, index: u32) -> VhostUserResult<&Vring> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn vmm_va_to_gpa(&self, vmm_va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm_va >= m.vmm_addr && vmm_va - m.vmm_addr < m.size)
            .map(|m| vmm_va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| handler_error("address outside every memory region"))
    }

    /// The worker of queue `index` and the queue's index among that worker's queues.
    fn owner(&self, index: usize) -> (&WorkerLoop, usize) {
        let threads = self.loops.len().max(1);
        (&self.loops[index % threads], index / threads)
    }

    /// Watches the queue's kick eventfd on its worker while the queue is ready and enabled,
    /// and not otherwise, so that its requests are taken exactly then. A newly watched kick
    /// is made readable, so that chains the guest added before are taken even if it never
    /// kicks again.
    fn update_registration(&self, index: usize) -> VhostUserResult<()> {
        let vring = &self.vrings[index];
        let state = vring.get_ref();
        let Some(kick) = state.kick() else {
            return Ok(());
        };
        let (worker, local) = self.owner(index);
        if state.get_queue().ready() && state.is_enabled() {
            match worker.register_listener(kick.as_raw_fd(), EventSet::IN, local as u64) {
                Ok(()) => {
                    let _ = kick.write(1);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(VhostUserError::ReqHandlerError(e)),
            }
        } else {
            let _ = worker.unregister_listener(kick.as_raw_fd(), EventSet::IN, local as u64);
        }
        Ok(())
    }

    /// A queue whose kick (or call) arrived while it was not ready starts now.
    fn start_if_set_up(&self, index: usize) -> VhostUserResult<()> {
        let needs_start = {
            let state = self.vrings[index].get_ref();
            !state.get_queue().ready() && state.kick().is_some()
        };
        if needs_start {
            self.vrings[index].set_queue_ready(true);
        }
        self.update_registration(index)
    }

    /// Guards `mem`'s regions against truncation, then publishes it to the queues and the
    /// workers; an error (regions that can be neither sealed nor guarded) refuses the table,
    /// which is never published, and ends the connection.
    fn publish(&mut self, mem: GuestMemoryMmap) -> VhostUserResult<()> {
        let atomic = &self.mem;
        self.backend
            .guard_and_publish(mem, |mem| {
                atomic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(mem);
                // Only this thread publishes: what it reads back is what it published.
                atomic.memory().into_inner()
            })
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn check_feature(&self, feature: VhostUserVirtioFeatures) -> VhostUserResult<()> {
        if self.acked_features & feature.bits() != 0 {
            Ok(())
        } else {
            Err(VhostUserError::InactiveFeature(feature))
        }
    }
}

impl VhostUserBackendReqHandlerMut for FrontendHandler {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(VhostUserError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.owned = false;
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        for index in 0..self.vrings.len() {
            self.vrings[index].set_enabled(false);
            self.update_registration(index)?;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        // Without the vhost-user protocol bit every ring is enabled at once (the spec's ring
        // states); with it, rings keep their state until SET_VRING_ENABLE.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.vrings.len() {
                self.vrings[index].set_enabled(true);
                self.update_registration(index)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        // The relay checked every region against its file (see crate::fdcheck).
        for (region, file) in ctx.iter().zip(files) {
            let guest = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| handler_error("a memory region does not fit the address space"))?;
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(guest);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(handler_error)?;
        self.publish(mem)?;
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let max = self.backend.max_queue_size();
        if num == 0 || num as usize > max {
            error!(
                index,
                num, max, "The frontend asked for a queue size out of range"
            );
            return Err(VhostUserError::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        if self.mappings.is_empty() {
            return Err(VhostUserError::InvalidParam);
        }
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| VhostUserError::InvalidParam)?;
        // SET_VRING_BASE restores only the available index; the used index is where the
        // guest's memory says it is (a rebooted driver starts again from 0).
        let idx = vring
            .queue_used_idx()
            .map_err(|_| VhostUserError::BackendInternalError)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // The relay held this message back until the queue's worker had stopped it and
        // completed its requests in flight (`DeviceLink::must_wait`): this answers at once.
        vring.set_queue_ready(false);
        self.update_registration(index as usize)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(u32::from(index))?.clone();
        // The kick being replaced leaves its worker's epoll set first. Closing it would not
        // take it out: the set watches the eventfd itself, which the frontend's descriptor
        // keeps open, and an old kick nobody reads any more would wake the worker for ever.
        if let Some(old) = vring.get_ref().kick() {
            let (worker, local) = self.owner(usize::from(index));
            // Not in the set (the queue was not being served) is fine.
            let _ = worker.unregister_listener(old.as_raw_fd(), EventSet::IN, local as u64);
        }
        vring.set_kick(file);
        self.start_if_set_up(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(u32::from(index))?.clone();
        vring.set_call(file);
        self.start_if_set_up(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, _features: u64) -> VhostUserResult<()> {
        // vhost's request handler keeps the acknowledged set (REPLY_ACK, which requests it
        // takes) itself; nothing here depends on it.
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        self.check_feature(VhostUserVirtioFeatures::PROTOCOL_FEATURES)?;
        self.vring(index)?.set_enabled(enable);
        self.update_registration(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.backend.set_config(offset, buf);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        // Answered by the relay, which never passes it on.
        Err(VhostUserError::InvalidOperation("answered by the relay"))
    }

    fn set_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
        _file: File,
    ) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("answered by the relay"))
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        // The slots advertised (GET_MAX_MEM_SLOTS) are all a frontend gets: each region is a
        // mapping and a descriptor held for the connection's life.
        if self.mappings.len() >= MAX_MEM_SLOTS {
            return Err(VhostUserError::InvalidOperation(
                "every advertised memory slot is in use",
            ));
        }
        let guest = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| handler_error("a memory region does not fit the address space"))?,
        );
        let mem = self
            .mem
            .memory()
            .insert_region(guest)
            .map_err(handler_error)?;
        self.publish(mem)?;
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(handler_error)?;
        self.publish(mem)?;
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> VhostUserResult<Option<File>> {
        Err(VhostUserError::InvalidOperation("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        // LOG_SHMFD is never offered, and the daemon logs no dirty pages. A frontend that
        // enables it anyway gets a log with no memory to cover taken (and closed at once,
        // costing nothing), and one over guest memory refused: that would end its connection.
        if vm_memory::GuestMemoryBackend::num_regions(&*self.mem.memory()) > 0 {
            return Err(VhostUserError::InvalidOperation(
                "dirty page logging is not supported",
            ));
        }
        debug!("Ignoring a dirty log over no guest memory (LOG_SHMFD was never offered)");
        Ok(())
    }
}

/// What the relay drives for one connection (see [`crate::relay::Device`]).
pub struct DeviceLink {
    requests: BackendReqHandler<Mutex<FrontendHandler>>,
    handler: Arc<Mutex<FrontendHandler>>,
    backend: Arc<BlkBackend>,
}

impl DeviceLink {
    /// The link over `handler`, reading its messages from `sock` (the private socket's end
    /// the relay does not hold; made non-blocking here).
    pub fn new(handler: FrontendHandler, sock: UnixStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let backend = Arc::clone(&handler.backend);
        let handler = Arc::new(Mutex::new(handler));
        Ok(DeviceLink {
            requests: BackendReqHandler::from_stream(sock, Arc::clone(&handler)),
            handler,
            backend,
        })
    }
}

impl crate::relay::Device for DeviceLink {
    fn wake_fd(&self) -> RawFd {
        self.backend.stopped_fd()
    }

    fn must_wait(&mut self, request: u32, body: &[u8]) -> bool {
        if request != GET_VRING_BASE {
            return false;
        }
        // A malformed message goes on: the handler refuses it.
        let Some(index) = body
            .get(0..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return false;
        };
        let handler = self.handler.lock().unwrap_or_else(|e| e.into_inner());
        if index as usize >= handler.vrings.len() {
            return false;
        }
        let (worker, local) = handler.owner(index as usize);
        debug!(queue = index, "Stopping a queue for GET_VRING_BASE");
        // Consumed stop notices of earlier requests must not release this one.
        self.backend.clear_stopped();
        worker.request_stop(local);
        true
    }

    fn ready(&mut self) -> bool {
        self.backend.clear_stopped()
    }

    fn handle(&mut self) -> Result<(), VhostUserError> {
        self.requests.handle_request()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceParams;
    use crate::budget::Budgets;
    use crate::request::DeviceInfo;
    use crate::throttle::ExportThrottle;
    use crate::virtio_blk::{ID_BYTES, MAX_QUEUE_SIZE};
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// The handler of a read-only connection with one queue, served by one worker loop
    /// (not running: the test looks at what it would be woken for).
    fn handler_with_one_loop(name: &str) -> (FrontendHandler, Arc<WorkerLoop>, Vring) {
        let dir = std::env::temp_dir().join(format!("qcow2d-handler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = qcow2d_tests::create_qcow2_in(&dir, name, "", "16M");
        let options = qcow2d_engine::OpenOptions {
            read_only: true,
            ..qcow2d_engine::OpenOptions::default()
        };
        let image = qcow2d_engine::Image::open(&path, &options).unwrap();
        let params = DeviceParams {
            num_queues: 1,
            shards: 1,
            device: DeviceInfo {
                capacity: image.virtual_size(),
                read_only: true,
                serial: [0; ID_BYTES],
            },
            cluster_size: image.cluster_size(),
            writeback: Arc::new(AtomicBool::new(false)),
            metrics: None,
            throttle: Arc::new(ExportThrottle::default()),
            budgets: Budgets::default(),
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(&image, &params, &mem, &[]).unwrap());
        let vring = Vring::new(mem.clone(), MAX_QUEUE_SIZE as u16).unwrap();
        let worker = Arc::new(WorkerLoop::new().unwrap());
        let handler =
            FrontendHandler::new(backend, vec![vring.clone()], mem, vec![Arc::clone(&worker)]);
        (handler, worker, vring)
    }

    /// The daemon's own descriptor of `kick`, as SET_VRING_KICK hands it over (the
    /// frontend keeps its own).
    fn handed_over(kick: &EventFd) -> File {
        let copy = kick.try_clone().unwrap();
        // SAFETY: the descriptor was just duplicated and is owned by `copy` alone, whose
        // ownership the file takes over.
        unsafe { File::from_raw_fd(copy.into_raw_fd()) }
    }

    /// A frontend that replaces a served queue's kick and goes on writing the old one (it
    /// keeps its descriptor, so the eventfd stays open): the worker is not woken for the old
    /// kick, which nobody reads any more and which would otherwise wake it for ever.
    #[test]
    fn a_replaced_kick_no_longer_wakes_the_worker() {
        let (mut handler, worker, vring) = handler_with_one_loop("kick.qcow2");
        // Without the vhost-user protocol bit every queue is enabled at once.
        handler.set_features(0).unwrap();
        let old = EventFd::new(EFD_NONBLOCK).unwrap();
        handler.set_vring_kick(0, Some(handed_over(&old))).unwrap();
        // A newly served queue is woken once, for chains added before its kick was set.
        assert_eq!(worker.ready_now(), vec![0]);
        assert!(vring.read_kick(), "the queue is served");
        assert_eq!(worker.ready_now(), Vec::<u64>::new());
        old.write(1).unwrap();
        assert_eq!(worker.ready_now(), vec![0], "the kick wakes its worker");
        old.read().unwrap();

        let new = EventFd::new(EFD_NONBLOCK).unwrap();
        handler.set_vring_kick(0, Some(handed_over(&new))).unwrap();
        assert_eq!(worker.ready_now(), vec![0]);
        assert!(vring.read_kick());
        assert_eq!(worker.ready_now(), Vec::<u64>::new());
        old.write(1).unwrap();
        assert_eq!(
            worker.ready_now(),
            Vec::<u64>::new(),
            "the replaced kick still wakes the worker"
        );
        new.write(1).unwrap();
        assert_eq!(worker.ready_now(), vec![0], "the new kick wakes it");

        // A kick taken away (no descriptor) stops waking it too.
        assert!(vring.read_kick());
        handler.set_vring_kick(0, None).unwrap();
        new.write(1).unwrap();
        assert_eq!(worker.ready_now(), Vec::<u64>::new());
    }
}
