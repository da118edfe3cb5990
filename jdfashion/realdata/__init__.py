"""The Grocery Store protocol (docs/REALDATA.md): every results-table row from one call, each rerunnable.

Real photos of real products test what the generated demo data cannot: whether training adds anything
to the pretrained network it starts from, and whether the MGPA branches help, on identities never
seen in training. ``protocol`` builds the lists (images read in place through ``file://`` URLs),
``settings`` declares a run, ``rows`` defines each row, ``run`` trains, ranks and fuses them,
``bench`` runs the table, ``table`` holds the results and renders them.

CPU time counts this process and the DataLoader workers it has reaped (``os.times``), because on two
cores the workers' decoding is a real share of the cost that ``time.process_time`` alone would hide.
"""
