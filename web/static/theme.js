// The page's colour theme, applied before the first paint (a classic script in <head>, so a
// page set to dark never flashes light). "system" (the default) follows prefers-color-scheme;
// "light" and "dark" are kept in localStorage ("relay.theme") and set html[data-theme].
// app.js owns the toggle button.
(() => {
  let choice = null;
  try {
    choice = localStorage.getItem("relay.theme");
  } catch {
    /* storage disabled: follow the system */
  }
  if (choice === "light" || choice === "dark") document.documentElement.dataset.theme = choice;
})();
