pub mod kernel;
pub mod passport;
