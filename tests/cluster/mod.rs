//! Node cluster primary, hand-off mode and the admin endpoint (issue 6).
