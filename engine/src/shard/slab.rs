//! Growable arenas of reusable entries, each addressed by an id of its own type.
//!
//! Entries are reset and reused rather than dropped, so the vectors they own keep their
//! capacity: in steady state, allocating an entry allocates no memory. Each arena has its id
//! type ([`ReqId`], [`PartId`], [`OpId`], [`AllocId`]), so an id of one cannot index another.

use std::marker::PhantomData;

/// An arena's id: an index into its entries.
pub(super) trait SlabId: Copy + std::fmt::Debug {
    /// The id of entry `index`.
    fn from_index(index: u32) -> Self;
    /// The entry's index.
    fn index(self) -> u32;
}

macro_rules! slab_ids {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub(super) struct $name(u32);

        impl SlabId for $name {
            fn from_index(index: u32) -> Self {
                $name(index)
            }
            fn index(self) -> u32 {
                self.0
            }
        }

        /// The id as an io_uring entry's user data, or in a token.
        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                u64::from(id.0)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}

slab_ids! {
    /// A request in the shard's arena (its own, or a piece served for another shard).
    ReqId;
    /// A part of a request: a guest range at one layer of the chain.
    PartId;
    /// An operation: one io_uring submission, its id the entry's user data.
    OpId;
    /// An allocating write of one cluster.
    AllocId;
}

/// See the module documentation.
pub struct Slab<I, T> {
    items: Vec<T>,
    free: Vec<u32>,
    live: usize,
    id: PhantomData<I>,
}

impl<I: SlabId, T: Default> Slab<I, T> {
    /// An empty slab with room for `capacity` entries before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        Slab {
            items: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            live: 0,
            id: PhantomData,
        }
    }

    /// Takes an entry (a previously freed one when available) and returns its id.
    /// The entry holds whatever the last user left: the caller initialises every field.
    pub fn alloc(&mut self) -> I {
        self.live += 1;
        if let Some(index) = self.free.pop() {
            return I::from_index(index);
        }
        self.items.push(T::default());
        I::from_index((self.items.len() - 1) as u32)
    }

    /// Returns an entry to the free list.
    pub fn free(&mut self, id: I) {
        debug_assert!(
            !self.free.contains(&id.index()),
            "double free of slab entry {id:?}"
        );
        self.live -= 1;
        self.free.push(id.index());
    }

    /// Entries allocated and not freed.
    pub fn live(&self) -> usize {
        self.live
    }
}

impl<I: SlabId, T> std::ops::Index<I> for Slab<I, T> {
    type Output = T;
    fn index(&self, id: I) -> &T {
        &self.items[id.index() as usize]
    }
}

impl<I: SlabId, T> std::ops::IndexMut<I> for Slab<I, T> {
    fn index_mut(&mut self, id: I) -> &mut T {
        &mut self.items[id.index() as usize]
    }
}
