//! Where records go: the route of a writer schema id, and the destination of one record. The
//! router decides them; the event loop follows them.

use crate::models::Rejection;

/// Where the records of one writer schema id go.
#[derive(Debug, Clone)]
pub(super) enum Route {
    Table(usize),
    /// A top-level union: per branch, the table whose decoder knows the branch (under the union's
    /// id), or why no table takes it.
    Union(Vec<Result<usize, Rejection>>),
    Refused(Rejection),
}

/// Where one record goes.
pub(super) enum Destination {
    /// A table; `Some(i)`: decode `reframed[i]` (a union value without its branch index).
    Table(usize, Option<usize>),
    Letter(Rejection),
}
