pub mod passport;
