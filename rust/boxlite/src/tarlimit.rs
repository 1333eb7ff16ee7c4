//! A bound on what the `tar` crate reads between two entries of an untrusted archive.
//!
//! The crate keeps GNU long names and pax records in memory whatever size their header claims,
//! so an archive could make the host hold gigabytes for one "name". Its reader goes through
//! [`Budgeted`], and each step to the next entry goes through [`next_entry`].

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

/// Bytes the reader may take between two entries: their headers, long names and pax records,
/// and the padding (or unread content) of the entry before.
pub(crate) const HEADER_BUDGET: u64 = 64 * 1024;

/// A reader that, while its budget is armed, gives at most that many more bytes, then fails.
pub(crate) struct Budgeted<R> {
    inner: R,
    left: Rc<Cell<Option<u64>>>,
}

/// The handle that arms a [`Budgeted`] reader's budget.
#[derive(Clone)]
pub(crate) struct Meter(Rc<Cell<Option<u64>>>);

/// `inner` behind a budget, and the meter that arms it.
pub(crate) fn budgeted<R: Read>(inner: R) -> (Budgeted<R>, Meter) {
    let left = Rc::new(Cell::new(None));
    (
        Budgeted {
            inner,
            left: left.clone(),
        },
        Meter(left),
    )
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(left) = self.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 {
            return Err(std::io::Error::other(format!(
                "headers of more than {HEADER_BUDGET} bytes before one entry (a long name or \
                 extended header that large is not a file name)"
            )));
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..take])?;
        self.left.set(Some(left - n as u64));
        Ok(n)
    }
}

/// What stepping to the next entry gave, and whether it ran out of budget on the way.
pub(crate) struct Step<T> {
    pub entry: Option<std::io::Result<T>>,
    pub over_budget: bool,
}

/// The next entry of `entries`, read within [`HEADER_BUDGET`].
pub(crate) fn next_entry<T>(
    meter: &Meter,
    entries: &mut impl Iterator<Item = std::io::Result<T>>,
) -> Step<T> {
    meter.0.set(Some(HEADER_BUDGET));
    let entry = entries.next();
    let over_budget = meter.0.get() == Some(0);
    meter.0.set(None);
    Step { entry, over_budget }
}
