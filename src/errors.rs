//! The one way a best-effort operation reports failure: DEL, GC and the agent's cleanup run every
//! step whatever fails before, collect the failures in an [`ErrorList`], and report them
//! together at the end. A CNI verb turns the list into one error with
//! [`crate::cni::CniError::from_list`], whose rule for the code is stated there.

use std::fmt;

/// The failures of one best-effort operation, in the order they happened.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorList<E> {
    errors: Vec<E>,
}

impl<E> Default for ErrorList<E> {
    fn default() -> Self {
        Self { errors: Vec::new() }
    }
}

impl<E> ErrorList<E> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, error: impl Into<E>) {
        self.errors.push(error.into());
    }

    /// Keeps the error of `result` and goes on; answers the value, if there was one.
    pub fn keep<T>(&mut self, result: Result<T, impl Into<E>>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// The first failure: the one the others most likely followed from.
    pub fn first(&self) -> Option<&E> {
        self.errors.first()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, E> {
        self.errors.iter()
    }
}

impl<E> IntoIterator for ErrorList<E> {
    type Item = E;
    type IntoIter = std::vec::IntoIter<E>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl<'a, E> IntoIterator for &'a ErrorList<E> {
    type Item = &'a E;
    type IntoIter = std::slice::Iter<'a, E>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Every message, in order, separated by "; ".
impl<E: fmt::Display> fmt::Display for ErrorList<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_in_order_and_keeps_going() {
        let mut list: ErrorList<String> = ErrorList::new();
        assert!(list.is_empty());
        assert_eq!(list.keep(Ok::<_, String>(3)), Some(3));
        assert_eq!(list.keep(Err::<u8, _>("first")), None);
        list.push("second");
        assert_eq!(list.len(), 2);
        assert_eq!(list.first().map(String::as_str), Some("first"));
        assert_eq!(list.to_string(), "first; second");
    }
}
