pub mod ledger;
pub mod passport;
