//! A growable arena of reusable entries addressed by `u32`.
//!
//! Entries are reset and reused rather than dropped, so the vectors they own keep their
//! capacity: in steady state, allocating an entry allocates no memory.

/// See the module documentation.
pub struct Slab<T> {
    items: Vec<T>,
    free: Vec<u32>,
    live: usize,
}

impl<T: Default> Slab<T> {
    /// An empty slab with room for `capacity` entries before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        Slab {
            items: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            live: 0,
        }
    }

    /// Takes an entry (a previously freed one when available) and returns its id.
    /// The entry holds whatever the last user left: the caller initialises every field.
    pub fn alloc(&mut self) -> u32 {
        self.live += 1;
        if let Some(id) = self.free.pop() {
            return id;
        }
        self.items.push(T::default());
        (self.items.len() - 1) as u32
    }

    /// Returns an entry to the free list.
    pub fn free(&mut self, id: u32) {
        debug_assert!(!self.free.contains(&id), "double free of slab entry {id}");
        self.live -= 1;
        self.free.push(id);
    }

    /// Entries allocated and not freed.
    pub fn live(&self) -> usize {
        self.live
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;
    fn index(&self, id: u32) -> &T {
        &self.items[id as usize]
    }
}

impl<T> std::ops::IndexMut<u32> for Slab<T> {
    fn index_mut(&mut self, id: u32) -> &mut T {
        &mut self.items[id as usize]
    }
}
